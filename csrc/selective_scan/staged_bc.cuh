// One tile's B and C staged in a scan kernel's dynamic shared memory, and, in a backward that asks for
// them, the tile's dB and dC sums after them: arrays of `size` elements each (their layout is the
// kernel's), null where absent. Shared by the selective-scan and SSD (Mamba-2) kernels.
#pragma once

#include <cstddef>
#include <cstdint>

namespace shammie::ssm {

template <typename acc_t>
struct StagedBC {
  acc_t* b;
  acc_t* c;
  acc_t* db;
  acc_t* dc;
};

// Dynamic shared memory bytes for the arrays present.
template <typename acc_t>
size_t staged_bc_bytes(int64_t size, bool b, bool c, bool grads) {
  return static_cast<size_t>((int(b) + int(c)) * (grads ? 2 : 1) * size) * sizeof(acc_t);
}

template <typename acc_t>
__device__ StagedBC<acc_t> carve_staged_bc(acc_t* dynamic, int64_t size, bool b, bool c, bool grads) {
  auto take = [&](bool present) {
    acc_t* at = present ? dynamic : nullptr;
    if (present) dynamic += size;
    return at;
  };
  StagedBC<acc_t> staged;
  staged.b = take(b);
  staged.c = take(c);
  staged.db = take(b && grads);
  staged.dc = take(c && grads);
  return staged;
}

}  // namespace shammie::ssm
