// Conversions between a kernel's storage type and its accumulation type, written so that CPU loops
// over them vectorize. c10::BFloat16's conversions go through a memcpy (to float) and a branch on NaN
// (from float) that GCC leaves scalar: in bf16 loops they took most of the time. These give the same
// results (widening is exact; narrowing rounds to nearest even, NaN to a quiet NaN, with selects);
// every other pair is a plain cast.
#pragma once

#include <c10/util/BFloat16.h>

#include <bit>
#include <cstdint>

namespace shammie {

template <typename out_t, typename acc_t>
inline out_t to_storage(acc_t v) {
  if constexpr (std::is_same_v<out_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    const uint32_t bits = std::bit_cast<uint32_t>(v);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    // All ones for a NaN: bit arithmetic, not a ?: that GCC may keep as a branch.
    const uint32_t nan = 0u - static_cast<uint32_t>((bits & 0x7FFFFFFFu) > 0x7F800000u);
    return c10::BFloat16(static_cast<uint16_t>((rounded & ~nan) | (0x7FC0u & nan)), c10::BFloat16::from_bits());
  } else {
    return static_cast<out_t>(v);
  }
}

template <typename acc_t, typename in_t>
inline acc_t from_storage(in_t v) {
  if constexpr (std::is_same_v<in_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    return std::bit_cast<float>(static_cast<uint32_t>(v.x) << 16);
  } else {
    return static_cast<acc_t>(v);
  }
}

}  // namespace shammie
