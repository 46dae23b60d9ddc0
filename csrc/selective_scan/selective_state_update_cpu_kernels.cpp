// CPU kernel of selective_state_update (math in ssm_math.h), compiled once per instruction set:
// parallel over channels (batch, head, dim), the loop over the N states vectorized.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "common/cpu_isa.h"
#include "selective_scan/selective_state_update.h"
#include "selective_scan/ssm_math.h"

SHAMMIE_CPU_TARGET_BEGIN

namespace shammie::SHAMMIE_CPU_NAMESPACE {
namespace {

template <typename scalar_t, typename state_t>
void update_typed(const ssm::StateUpdateArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.heads, P = a.dim, N = a.dstate, heads_per_group = a.heads / a.groups;
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

  at::parallel_for(0, a.batch * H * P, std::max<int64_t>(1, 4096 / N), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {   // row = (b·H + h)·P + p
      const int64_t p = row % P, h = (row / P) % H, b = row / (P * H), g = h / heads_per_group;
      const int64_t channel = h * P + p;
      const acc_t xv = acc_t(x[row]);
      const acc_t step = ssm::step_size(acc_t(dt[row]), dt_bias[channel], a.softplus);
      const acc_t* a_row = A + channel * N;
      const scalar_t* b_row = B + (b * a.groups + g) * N;
      const scalar_t* c_row = C + (b * a.groups + g) * N;
      state_t* s = state + b * sb + h * sh + p * sp;
      acc_t y = 0;
      if (sn == 1) {   // the usual layout: a unit-stride loop the compiler vectorizes
#pragma omp simd reduction(+ : y)
        for (int64_t n = 0; n < N; ++n) {
          const acc_t hn = ssm::state_step(acc_t(s[n]), step, a_row[n], acc_t(b_row[n]), xv);
          s[n] = state_t(hn);
          y += hn * acc_t(c_row[n]);
        }
      } else {
        for (int64_t n = 0; n < N; ++n) {
          const acc_t hn = ssm::state_step(acc_t(s[n * sn]), step, a_row[n], acc_t(b_row[n]), xv);
          s[n * sn] = state_t(hn);
          y += hn * acc_t(c_row[n]);
        }
      }
      y += D[channel] * xv;
      out[row] = scalar_t(z ? ssm::gate(y, acc_t(z[row])) : y);
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
