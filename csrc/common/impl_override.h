// The environment switch of an op with several implementations (SHAMMIE_MONARCH_IMPL,
// SHAMMIE_FRECHET_IMPL): one of the op's names forces that implementation, "auto" or unset leaves the
// choice to the op. Read on every call, so tests and benchmarks can flip it inside one process.
#pragma once

#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>

#include "common/errors.h"

namespace shammie {

// The position in `names` of the implementation `variable` forces, or nullopt for auto.
inline std::optional<int> impl_override(const char* variable, std::initializer_list<std::string_view> names) {
  const char* value = std::getenv(variable);
  if (value == nullptr || *value == '\0' || std::string_view(value) == "auto") return std::nullopt;
  const std::string_view v(value);
  std::string allowed = "auto";
  int position = 0;
  for (const std::string_view name : names) {
    if (v == name) return position;
    allowed.append(", ").append(name);
    ++position;
  }
  SHAMMIE_CHECK_VALUE(false, variable, " must be one of ", allowed, "; got '", v, "'");
  return std::nullopt;   // not reached: the check throws
}

}  // namespace shammie
