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
__host__ __device__ size_t staged_bc_bytes(int64_t size, bool b, bool c, bool grads) {
  return static_cast<size_t>((int(b) + int(c)) * (grads ? 2 : 1) * size) * sizeof(acc_t);
}

// What one launch stages, decided on the host from `limit`, the dynamic shared memory the kernel may
// take: B / C where their tile fits (else the kernel reads them from global memory), and the backward's
// dB / dC tile sums after them where those fit too and `want_grads` (else its atomics go to global).
// `smem` is the dynamic shared memory to launch with.
struct StagingPlan {
  bool stage_bc;
  bool grads_in_shared;
  size_t smem;
};

template <typename acc_t>
StagingPlan plan_staging(int64_t size, bool b, bool c, bool want_grads, size_t limit) {
  StagingPlan plan{};
  plan.stage_bc = staged_bc_bytes<acc_t>(size, b, c, false) <= limit;
  plan.grads_in_shared = plan.stage_bc && want_grads && staged_bc_bytes<acc_t>(size, b, c, true) <= limit;
  plan.smem = plan.stage_bc ? staged_bc_bytes<acc_t>(size, b, c, plan.grads_in_shared) : 0;
  return plan;
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
