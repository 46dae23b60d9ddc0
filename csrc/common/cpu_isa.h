// Run-time choice among the copies of the CPU kernels compiled for different instruction sets
// (cmake/shammie_utils.cmake: shammie_add_cpu_kernels). The environment variable
// SHAMMIE_CPU_ISA=base|avx2|avx512 caps the choice, e.g. to test the portable copy.
#pragma once

namespace shammie {

enum class CpuIsa { base, avx2, avx512 };

// The best copy that this build has and this processor runs, capped by SHAMMIE_CPU_ISA.
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

}  // namespace shammie

// A kernel TU compiled with -DSHAMMIE_CPU_ISA=avx2 defines its functions in shammie::cpu_avx2.
#define SHAMMIE_CPU_CONCAT_(a, b) a##b
#define SHAMMIE_CPU_CONCAT(a, b) SHAMMIE_CPU_CONCAT_(a, b)
#define SHAMMIE_CPU_NAMESPACE SHAMMIE_CPU_CONCAT(cpu_, SHAMMIE_CPU_ISA)

// Around a kernel TU's own code (after its includes): compile it for this copy's instruction set.
#define SHAMMIE_CPU_PRAGMA_(x) _Pragma(#x)
#define SHAMMIE_CPU_PRAGMA(x) SHAMMIE_CPU_PRAGMA_(x)
#if defined(SHAMMIE_CPU_ISA_TARGET) && defined(__clang__)
#define SHAMMIE_CPU_TARGET_BEGIN \
  SHAMMIE_CPU_PRAGMA(clang attribute push(__attribute__((target(SHAMMIE_CPU_ISA_TARGET))), apply_to = function))
#define SHAMMIE_CPU_TARGET_END _Pragma("clang attribute pop")
#elif defined(SHAMMIE_CPU_ISA_TARGET) && defined(__GNUC__)
#define SHAMMIE_CPU_TARGET_BEGIN _Pragma("GCC push_options") SHAMMIE_CPU_PRAGMA(GCC target(SHAMMIE_CPU_ISA_TARGET))
#define SHAMMIE_CPU_TARGET_END _Pragma("GCC pop_options")
#else
#define SHAMMIE_CPU_TARGET_BEGIN
#define SHAMMIE_CPU_TARGET_END
#endif

// SHAMMIE_DECLARE_CPU_KERNELS(declarations...) declares a kernel TU's functions in every copy's
// namespace that this build has (shammie::cpu_base, cpu_avx2, cpu_avx512); use it inside namespace shammie.
#define SHAMMIE_DECLARE_CPU_KERNELS_IN(ns, ...) \
  namespace ns {                                 \
  __VA_ARGS__                                    \
  }
#if defined(SHAMMIE_HAS_CPU_AVX512)
#define SHAMMIE_DECLARE_CPU_KERNELS_AVX512(...) SHAMMIE_DECLARE_CPU_KERNELS_IN(cpu_avx512, __VA_ARGS__)
#else
#define SHAMMIE_DECLARE_CPU_KERNELS_AVX512(...)
#endif
#if defined(SHAMMIE_HAS_CPU_AVX2)
#define SHAMMIE_DECLARE_CPU_KERNELS_AVX2(...) SHAMMIE_DECLARE_CPU_KERNELS_IN(cpu_avx2, __VA_ARGS__)
#else
#define SHAMMIE_DECLARE_CPU_KERNELS_AVX2(...)
#endif
#define SHAMMIE_DECLARE_CPU_KERNELS(...)                  \
  SHAMMIE_DECLARE_CPU_KERNELS_IN(cpu_base, __VA_ARGS__)   \
  SHAMMIE_DECLARE_CPU_KERNELS_AVX2(__VA_ARGS__)           \
  SHAMMIE_DECLARE_CPU_KERNELS_AVX512(__VA_ARGS__)

// SHAMMIE_CPU_DISPATCH(fn, args...) calls shammie::cpu_<isa>::fn(args...) for the chosen copy.
#if defined(SHAMMIE_HAS_CPU_AVX512)
#define SHAMMIE_CPU_CASE_AVX512(fn, ...) \
  case ::shammie::CpuIsa::avx512: return ::shammie::cpu_avx512::fn(__VA_ARGS__);
#else
#define SHAMMIE_CPU_CASE_AVX512(fn, ...)
#endif
#if defined(SHAMMIE_HAS_CPU_AVX2)
#define SHAMMIE_CPU_CASE_AVX2(fn, ...) \
  case ::shammie::CpuIsa::avx2: return ::shammie::cpu_avx2::fn(__VA_ARGS__);
#else
#define SHAMMIE_CPU_CASE_AVX2(fn, ...)
#endif
#define SHAMMIE_CPU_DISPATCH(fn, ...)                    \
  do {                                                   \
    switch (::shammie::cpu_isa()) {                      \
      SHAMMIE_CPU_CASE_AVX512(fn, __VA_ARGS__)           \
      SHAMMIE_CPU_CASE_AVX2(fn, __VA_ARGS__)             \
      default: return ::shammie::cpu_base::fn(__VA_ARGS__); \
    }                                                    \
  } while (0)
