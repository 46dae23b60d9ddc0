// CPU kernel of selective_state_update (math in ssm_math.h), compiled once per instruction set:
// parallel over blocks of channels (batch, head, dim); per-channel math vectorized across the block,
// the loop over the N states vectorized within a channel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "common/cpu_convert.h"
#include "common/cpu_isa.h"
#include "selective_scan/selective_state_update.h"
#include "selective_scan/ssm_math.h"

SHAMMIE_CPU_TARGET_BEGIN

namespace shammie::SHAMMIE_CPU_NAMESPACE {
namespace {

constexpr int64_t kChannelBlock = 256;

template <typename scalar_t, typename state_t>
void update_typed(const ssm::StateUpdateArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.heads, P = a.dim, N = a.dstate, HP = a.heads * a.dim, heads_per_group = a.heads / a.groups;
  const int64_t sb = a.state.stride(0), sh = a.state.stride(1), sp = a.state.stride(2), sn = a.state.stride(3);
  state_t* state = a.state.mutable_data_ptr<state_t>();
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* dt = a.dt.const_data_ptr<scalar_t>();
  const scalar_t* z = a.z ? a.z->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* B = a.B.const_data_ptr<scalar_t>();
  const scalar_t* C = a.C.const_data_ptr<scalar_t>();
  const acc_t* A = a.A.const_data_ptr<acc_t>();
  const acc_t* D = a.D.const_data_ptr<acc_t>();
  const acc_t* dt_bias = a.dt_bias.const_data_ptr<acc_t>();
  scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
  const int64_t* state_rows = a.state_rows ? a.state_rows->const_data_ptr<int64_t>() : nullptr;
  const int64_t blocks_per_batch = (HP + kChannelBlock - 1) / kChannelBlock;

  // Work items: (batch, block of channels). The per-channel scalar math (step size, D, gate) runs
  // as vectorized passes over the block; the state loop over N sits between them.
  at::parallel_for(0, a.batch * blocks_per_batch, 1, [&](int64_t begin, int64_t end) {
    acc_t steps[kChannelBlock], ys[kChannelBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks_per_batch, c0 = (item % blocks_per_batch) * kChannelBlock;
      const int64_t count = std::min(kChannelBlock, HP - c0), r0 = b * HP + c0;
      const int64_t state_row = state_rows ? state_rows[b] : b;
      if (state_row < 0 || state_row >= a.state.size(0)) {   // a padding element
        std::fill_n(out + r0, count, to_storage<scalar_t>(acc_t(0)));
        continue;
      }
      if (a.softplus) {
#pragma omp simd
        for (int64_t i = 0; i < count; ++i) steps[i] = ssm::step_size(from_storage<acc_t>(dt[r0 + i]), dt_bias[c0 + i], true);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < count; ++i) steps[i] = from_storage<acc_t>(dt[r0 + i]) + dt_bias[c0 + i];
      }
      for (int64_t i = 0; i < count; ++i) {
        const int64_t channel = c0 + i, h = channel / P, p = channel % P, g = h / heads_per_group;
        const acc_t xv = from_storage<acc_t>(x[r0 + i]), step = steps[i];
        const acc_t* a_row = A + channel * N;
        const scalar_t* b_row = B + (b * a.groups + g) * N;
        const scalar_t* c_row = C + (b * a.groups + g) * N;
        state_t* s = state + state_row * sb + h * sh + p * sp;
        acc_t y = 0;
        if (sn == 1) {   // the usual layout: a unit-stride loop the compiler vectorizes
          // simdlen: with 16-bit inputs GCC would otherwise pick 32 iterations per step, more than
          // Mamba-1's N = 16, and run only the scalar remainder.
#pragma omp simd simdlen(16) reduction(+ : y)
          for (int64_t n = 0; n < N; ++n) {
            const acc_t hn = ssm::state_step(from_storage<acc_t>(s[n]), step, a_row[n], from_storage<acc_t>(b_row[n]), xv);
            s[n] = to_storage<state_t>(hn);
            y += hn * from_storage<acc_t>(c_row[n]);
          }
        } else {
          for (int64_t n = 0; n < N; ++n) {
            const acc_t hn = ssm::state_step(from_storage<acc_t>(s[n * sn]), step, a_row[n], from_storage<acc_t>(b_row[n]), xv);
            s[n * sn] = to_storage<state_t>(hn);
            y += hn * from_storage<acc_t>(c_row[n]);
          }
        }
        ys[i] = y;
      }
      if (z) {
#pragma omp simd
        for (int64_t i = 0; i < count; ++i)
          out[r0 + i] = to_storage<scalar_t>(ssm::gate(ys[i] + D[c0 + i] * from_storage<acc_t>(x[r0 + i]), from_storage<acc_t>(z[r0 + i])));
      } else {
#pragma omp simd
        for (int64_t i = 0; i < count; ++i) out[r0 + i] = to_storage<scalar_t>(ys[i] + D[c0 + i] * from_storage<acc_t>(x[r0 + i]));
      }
    }
  });
}

}  // namespace

void selective_state_update(const ssm::StateUpdateArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "selective_state_update_cpu", [&] {
    if (args.state.scalar_type() == args.x.scalar_type()) update_typed<scalar_t, scalar_t>(args);
    else update_typed<scalar_t, float>(args);
  });
}

}  // namespace shammie::SHAMMIE_CPU_NAMESPACE

SHAMMIE_CPU_TARGET_END
