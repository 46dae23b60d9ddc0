// Picks the CPU kernel copy: the best instruction set compiled in and supported by this processor.
#include "common/errors.h"
#include "common/cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string_view>

namespace shammie {
namespace {

CpuIsa best_supported() {
#if defined(__x86_64__) || defined(_M_X64)
#if defined(SHAMMIE_HAS_CPU_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return CpuIsa::avx512;
#endif
#if defined(SHAMMIE_HAS_CPU_AVX2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return CpuIsa::avx2;
#endif
#endif
  return CpuIsa::base;
}

CpuIsa parse_cap(std::string_view s) {
  if (s == "base") return CpuIsa::base;
  if (s == "avx2") return CpuIsa::avx2;
  if (s == "avx512") return CpuIsa::avx512;
  SHAMMIE_CHECK_VALUE(false, "SHAMMIE_CPU_ISA must be one of base, avx2, avx512; got '", s, "'");
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa best = best_supported();
  // Read on each call (a getenv is cheap next to a kernel) so tests can switch copies.
  const char* cap = std::getenv("SHAMMIE_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  const CpuIsa wanted = parse_cap(cap);
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    default: return "base";
  }
}

}  // namespace shammie
