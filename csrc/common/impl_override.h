// The environment switch of an op with two implementations (SHAMMIE_MONARCH_IMPL,
// SHAMMIE_FRECHET_IMPL): "kernel" or "gemm" forces one, "auto" or unset leaves the choice to the op.
// Read on every call, so tests and benchmarks can flip it inside one process.
#pragma once

#include <cstdlib>
#include <optional>
#include <string_view>

#include "common/errors.h"

namespace shammie {

// true: the GEMM implementation is forced; false: the fused kernels; nullopt: auto.
inline std::optional<bool> gemm_override(const char* variable) {
  const char* value = std::getenv(variable);
  if (value == nullptr || *value == '\0' || std::string_view(value) == "auto") return std::nullopt;
  const std::string_view v(value);
  SHAMMIE_CHECK_VALUE(v == "kernel" || v == "gemm", variable, " must be auto, kernel or gemm; got '", v, "'");
  return v == "gemm";
}

}  // namespace shammie
