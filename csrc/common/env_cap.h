// A memory cap read from the environment (SHAMMIE_SSD_CHUNKED_MB, SHAMMIE_SCAN_WORKSPACE_MB): a
// positive whole number of MiB, `default_mib` when unset. Read on every call, so tests can change it.
#pragma once

#include <cstdint>
#include <cstdlib>

#include "common/errors.h"

namespace shammie {

inline int64_t env_cap_bytes(const char* variable, int64_t default_mib) {
  const char* cap = std::getenv(variable);
  int64_t mib = default_mib;
  if (cap != nullptr && *cap != '\0') {
    char* end = nullptr;
    mib = std::strtoll(cap, &end, 10);
    SHAMMIE_CHECK_VALUE(*end == '\0' && mib > 0, variable, " must be a positive integer (MiB), got '", cap, "'");
  }
  return mib << 20;
}

}  // namespace shammie
