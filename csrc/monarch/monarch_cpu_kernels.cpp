// CPU kernels of the Monarch product (math in monarch.h), compiled once per instruction set.
// Everything stays token-major, as x and y lie in memory; per tile of tokens:
//   u = W1·x     dot products along x's rows, or AXPYs along W1ᵀ's rows when q is wide;
//   y = W2·z     AXPYs along W2ᵀ's rows, stored through the butterfly shuffle (stride l);
// the backward mirrors them and accumulates the weight gradients as register-blocked outer
// products over the tile. Only the outputs are written to memory; u stays in cache.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/bf16_dot.h"
#include "common/cpu_convert.h"
#include "common/cpu_isa.h"
#include "monarch/monarch.h"

SHAMMIE_CPU_TARGET_BEGIN

namespace shammie::SHAMMIE_CPU_NAMESPACE {
namespace {

using monarch::Dims;

constexpr int kTile = 16;  // tokens per tile

template <typename acc_t>
constexpr int kLanes = 64 / sizeof(acc_t);  // one cache line: a vector register's worth or two

// out[o·out_o + t·out_t] = Σ_j w[o·w_row + j] · in[t·in_row + j]   for o < rows, t < tokens:
// the form for narrow outputs (few rows), where the sum runs along a long contiguous j.
// R rows × U tokens per step: each load of w serves U tokens and each load of in serves R rows.
template <typename acc_t, int R, int U>
inline void dot_block(int64_t K, const acc_t* w, int64_t w_row, const acc_t* in, int64_t in_row,
                      acc_t* out, int64_t out_o, int64_t out_t) {
  constexpr int L = kLanes<acc_t>;
  acc_t acc[R][U][L] = {};
  int64_t j0 = 0;
  for (; j0 + L <= K; j0 += L) {
    for (int u = 0; u < U; ++u) {
      const acc_t* x = in + u * in_row + j0;
      for (int r = 0; r < R; ++r) {
        const acc_t* wr = w + r * w_row + j0;
#pragma omp simd
        for (int v = 0; v < L; ++v) acc[r][u][v] += wr[v] * x[v];
      }
    }
  }
  // Horizontal sums as a pairwise tree (vectorizable), not a serial chain of L adds.
  for (int width = L / 2; width >= 1; width /= 2)
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u)
#pragma omp simd
        for (int v = 0; v < width; ++v) acc[r][u][v] += acc[r][u][v + width];
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < U; ++u) {
      acc_t sum = acc[r][u][0];
      for (int64_t j = j0; j < K; ++j) sum += w[r * w_row + j] * in[u * in_row + j];
      out[r * out_o + u * out_t] = sum;
    }
  }
}

template <typename acc_t, int R>
inline void dot_rows(int64_t tokens, int64_t K, const acc_t* w, int64_t w_row, const acc_t* in,
                     int64_t in_row, acc_t* out, int64_t out_o, int64_t out_t) {
  int64_t t = 0;
  for (; t + 2 <= tokens; t += 2)
    dot_block<acc_t, R, 2>(K, w, w_row, in + t * in_row, in_row, out + t * out_t, out_o, out_t);
  for (; t < tokens; ++t)
    dot_block<acc_t, R, 1>(K, w, w_row, in + t * in_row, in_row, out + t * out_t, out_o, out_t);
}

template <typename acc_t>
inline void rows_dot_tokens(int64_t rows, int64_t tokens, int64_t K, const acc_t* w,
                            int64_t w_row, const acc_t* in, int64_t in_row, acc_t* out,
                            int64_t out_o, int64_t out_t) {
  int64_t o = 0;
  for (; o + 4 <= rows; o += 4)
    dot_rows<acc_t, 4>(tokens, K, w + o * w_row, w_row, in, in_row, out + o * out_o, out_o, out_t);
  for (; o < rows; ++o)
    dot_rows<acc_t, 1>(tokens, K, w + o * w_row, w_row, in, in_row, out + o * out_o, out_o, out_t);
}

// out[t·out_row + j·out_j] = Σ_a coef[a·coef_a + t·coef_t] · w[a·w_row + j]   for t < tokens,
// j < cols: the form for wide outputs, vectorized along w's contiguous rows. U tokens × V
// columns of accumulators, one load of w per U multiply-adds; out_j ≠ 1 scatters the result
// (the butterfly shuffle), once per K multiply-adds. The last block of columns (Full = false)
// touches only `width` of them.
template <typename acc_t, typename out_t, int U, int V, bool Full>
inline void axpy_block(int64_t K, const acc_t* coef, int64_t coef_a, int64_t coef_t,
                       const acc_t* w, int64_t w_row, int width, out_t* out, int64_t out_row,
                       int64_t out_j) {
  const int n = Full ? V : width;
  acc_t acc[U][V] = {};
  for (int64_t a = 0; a < K; ++a) {
    const acc_t* wa = w + a * w_row;
    for (int u = 0; u < U; ++u) {
      const acc_t c = coef[a * coef_a + u * coef_t];
#pragma omp simd
      for (int v = 0; v < n; ++v) acc[u][v] += c * wa[v];
    }
  }
  for (int u = 0; u < U; ++u) {
    out_t* o = out + u * out_row;
    if (out_j == 1) {
#pragma omp simd
      for (int v = 0; v < n; ++v) o[v] = to_storage<out_t>(acc[u][v]);
    } else {
      for (int v = 0; v < n; ++v) o[v * out_j] = to_storage<out_t>(acc[u][v]);
    }
  }
}

template <typename acc_t, typename out_t, bool Full>
inline void axpy_columns(int64_t tokens, int64_t K, const acc_t* coef, int64_t coef_a,
                         int64_t coef_t, const acc_t* w, int64_t w_row, int width, out_t* out,
                         int64_t out_row, int64_t out_j) {
  constexpr int V = 2 * kLanes<acc_t>;
  int64_t t = 0;
  for (; t + 4 <= tokens; t += 4)
    axpy_block<acc_t, out_t, 4, V, Full>(K, coef + t * coef_t, coef_a, coef_t, w, w_row, width,
                                         out + t * out_row, out_row, out_j);
  for (; t < tokens; ++t)
    axpy_block<acc_t, out_t, 1, V, Full>(K, coef + t * coef_t, coef_a, coef_t, w, w_row, width,
                                         out + t * out_row, out_row, out_j);
}

template <typename acc_t, typename out_t>
inline void tokens_axpy_rows(int64_t tokens, int64_t cols, int64_t K, const acc_t* coef,
                             int64_t coef_a, int64_t coef_t, const acc_t* w, int64_t w_row,
                             out_t* out, int64_t out_row, int64_t out_j) {
  constexpr int V = 2 * kLanes<acc_t>;
  int64_t j0 = 0;
  for (; j0 + V <= cols; j0 += V)
    axpy_columns<acc_t, out_t, true>(tokens, K, coef, coef_a, coef_t, w + j0, w_row, V,
                                     out + j0 * out_j, out_row, out_j);
  if (j0 < cols)
    axpy_columns<acc_t, out_t, false>(tokens, K, coef, coef_a, coef_t, w + j0, w_row,
                                      static_cast<int>(cols - j0), out + j0 * out_j, out_row, out_j);
}

// g[o·g_row + j] += Σ_t a[o·a_row + t·a_t] · b[t·b_row + j]   for o < rows, j < cols, t < tokens:
// a weight gradient's share from one tile, R rows × W columns of accumulators held over the
// tile's tokens (no horizontal sums), for the columns [j0, j0 + W·⌊(cols − j0)/W⌋); returns where it
// stopped. R·W/L independent sums keep the FMA units busy.
template <typename acc_t, int R, int W>
inline int64_t outer_block(int64_t tokens, int64_t j0, int64_t cols, const acc_t* a, int64_t a_row, int64_t a_t,
                           const acc_t* b, int64_t b_row, acc_t* g, int64_t g_row) {
  for (; j0 + W <= cols; j0 += W) {
    acc_t acc[R][W];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma omp simd
      for (int v = 0; v < W; ++v) acc[r][v] = g[r * g_row + j0 + v];
    for (int64_t t = 0; t < tokens; ++t) {
      const acc_t* bt = b + t * b_row + j0;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const acc_t av = a[r * a_row + t * a_t];
#pragma omp simd
        for (int v = 0; v < W; ++v) acc[r][v] += av * bt[v];
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma omp simd
      for (int v = 0; v < W; ++v) g[r * g_row + j0 + v] = acc[r][v];
  }
  return j0;
}

// R rows: blocks of two vectors of columns, then one, then the scalar tail.
template <typename acc_t, int R>
inline void outer_rows(int64_t tokens, int64_t cols, const acc_t* a, int64_t a_row, int64_t a_t, const acc_t* b,
                       int64_t b_row, acc_t* g, int64_t g_row) {
  constexpr int L = kLanes<acc_t>;
  int64_t j0 = outer_block<acc_t, R, 2 * L>(tokens, 0, cols, a, a_row, a_t, b, b_row, g, g_row);
  j0 = outer_block<acc_t, R, L>(tokens, j0, cols, a, a_row, a_t, b, b_row, g, g_row);
  for (int r = 0; r < R; ++r)
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t j = j0; j < cols; ++j) g[r * g_row + j] += a[r * a_row + t * a_t] * b[t * b_row + j];
}

template <typename acc_t>
inline void accumulate_outer(int64_t rows, int64_t tokens, int64_t cols, const acc_t* a,
                             int64_t a_row, int64_t a_t, const acc_t* b, int64_t b_row, acc_t* g,
                             int64_t g_row) {
  int64_t o = 0;
  if (rows % 4 == 0 && rows <= 16)   // MoRe's few rows (q, r = 4, 8): whole blocks of 4
    for (; o < rows; o += 4)
      outer_rows<acc_t, 4>(tokens, cols, a + o * a_row, a_row, a_t, b, b_row, g + o * g_row, g_row);
  for (; o + 6 <= rows; o += 6)
    outer_rows<acc_t, 6>(tokens, cols, a + o * a_row, a_row, a_t, b, b_row, g + o * g_row, g_row);
  for (; o + 2 <= rows; o += 2)
    outer_rows<acc_t, 2>(tokens, cols, a + o * a_row, a_row, a_t, b, b_row, g + o * g_row, g_row);
  for (; o < rows; ++o)
    outer_rows<acc_t, 1>(tokens, cols, a + o * a_row, a_row, a_t, b, b_row, g + o * g_row, g_row);
}

// Token-major rows converted to acc_t: dst[t·width + j] = src[t·src_row + j].
template <typename scalar_t, typename acc_t>
inline void convert_rows(const scalar_t* src, int64_t src_row, int64_t tokens, int64_t width,
                         acc_t* dst) {
  for (int64_t t = 0; t < tokens; ++t) {
    const scalar_t* row = src + t * src_row;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) dst[t * width + j] = from_storage<acc_t>(row[j]);
  }
}

// The butterfly's output shuffle undone per token: grouped[c·s + m] = y[m·l + c].
template <typename scalar_t, typename acc_t>
inline void group_by_block(const Dims& d, const scalar_t* y, int64_t y_row, int64_t tokens,
                           acc_t* grouped) {
  for (int64_t t = 0; t < tokens; ++t) {
    const scalar_t* row = y + t * y_row;
    acc_t* out = grouped + t * d.out();
    for (int64_t m = 0; m < d.s; ++m)
      for (int64_t c = 0; c < d.l; ++c)
        out[c * d.s + m] = from_storage<acc_t>(row[monarch::y_index_of_v(c, m, d.l)]);
  }
}

// Columns of y per step of the second factor in y's order: two vectors.
template <typename acc_t>
constexpr int kOutputStep = 2 * kLanes<acc_t>;

// Whether the second factor can run in y's own order (see second_factor_in_output_order): the
// shuffle's period l and the step divide one another, so that the z values a step of y needs are
// consecutive values of u (l a multiple of the step), or one short pattern repeated (l divides it).
template <typename acc_t>
bool output_order(const Dims& d) {
  return d.l % kOutputStep<acc_t> == 0 || kOutputStep<acc_t> % d.l == 0;
}

// Weights in acc_t, in both orientations so that every product runs along contiguous rows:
// W1 as [i][a][j] and [i][j][a], W2 as [c][m][a] and [c][a][m]; and for the forward, when it can use
// it, W2 in y's order, w2o[a][m·l + c] = W2[c, m, a].
template <typename scalar_t, typename acc_t>
struct Weights {
  std::vector<acc_t> w1, w1t, w2, w2t, w2o;
  Weights(const at::Tensor& w1_in, const at::Tensor& w2_in, const Dims& d, bool for_forward)
      : w1(w1_in.const_data_ptr<scalar_t>(), w1_in.const_data_ptr<scalar_t>() + w1_in.numel()),
        w1t(w1.size()),
        w2(w2_in.const_data_ptr<scalar_t>(), w2_in.const_data_ptr<scalar_t>() + w2_in.numel()),
        w2t(w2.size()) {
    for (int64_t i = 0; i < d.k; ++i)
      for (int64_t a = 0; a < d.q; ++a)
        for (int64_t j = 0; j < d.p; ++j) w1t[(i * d.p + j) * d.q + a] = w1[(i * d.q + a) * d.p + j];
    for (int64_t c = 0; c < d.l; ++c)
      for (int64_t m = 0; m < d.s; ++m)
        for (int64_t a = 0; a < d.r; ++a) w2t[(c * d.r + a) * d.s + m] = w2[(c * d.s + m) * d.r + a];
    if (for_forward && output_order<acc_t>(d)) {
      w2o.resize(w2.size());
      for (int64_t c = 0; c < d.l; ++c)
        for (int64_t m = 0; m < d.s; ++m)
          for (int64_t a = 0; a < d.r; ++a)
            w2o[a * d.out() + monarch::y_index_of_v(c, m, d.l)] = w2[(c * d.s + m) * d.r + a];
    }
  }
};

// y[t, j] = Σ_a w2o[a, j] · u[t, a·l + j mod l] for one tile: the second factor with the shuffle
// folded into w2o, so y is written in contiguous vectors (not one scalar store per element at
// stride l). The z values of a step of V columns, u[a·l + (j0 + v) mod l], are u[a·l + j0 mod l + v]
// when l is a multiple of V (z_moves), else (l divides V) a pattern of l values repeated, the same
// for every j0, staged once per token (V values long). U tokens share each load of w2o.
template <typename acc_t, typename out_t, int U>
inline void second_factor_block(const Dims& d, const acc_t* w2o, const acc_t* z_src, int64_t z_token,
                                int64_t z_a, bool z_moves, out_t* y, int64_t y_row) {
  constexpr int V = kOutputStep<acc_t>;
  const int64_t out = d.out();
  int64_t j0 = 0;
  for (; j0 + V <= out; j0 += V) {
    const acc_t* z0 = z_src + (z_moves ? j0 % d.l : 0);
    acc_t acc[U][V];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u)
#pragma omp simd
      for (int v = 0; v < V; ++v) acc[u][v] = 0;
    for (int64_t a = 0; a < d.r; ++a) {
      const acc_t* wa = w2o + a * out + j0;
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const acc_t* z = z0 + u * z_token + a * z_a;
#pragma omp simd
        for (int v = 0; v < V; ++v) acc[u][v] += wa[v] * z[v];
      }
    }
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u)
#pragma omp simd
      for (int v = 0; v < V; ++v) y[u * y_row + j0 + v] = to_storage<out_t>(acc[u][v]);
  }
  for (; j0 < out; ++j0) {  // tail: fewer than V columns
    for (int u = 0; u < U; ++u) {
      acc_t sum = 0;
      for (int64_t a = 0; a < d.r; ++a) {
        const int64_t at = z_moves ? j0 % d.l : j0 % V;
        sum += w2o[a * out + j0] * z_src[u * z_token + a * z_a + at];
      }
      y[u * y_row + j0] = to_storage<out_t>(sum);
    }
  }
}

template <typename acc_t, typename out_t>
inline void second_factor_in_output_order(const Dims& d, const acc_t* w2o, const acc_t* u, int64_t tokens,
                                          acc_t* pattern, out_t* y, int64_t y_row) {
  constexpr int V = kOutputStep<acc_t>;
  const bool z_moves = d.l % V == 0;
  const acc_t* z_src = u;
  int64_t z_token = d.mid(), z_a = d.l;
  if (!z_moves) {  // pattern[t][a][v] = u[t, a·l + v mod l], v < V
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t a = 0; a < d.r; ++a)
        for (int64_t v0 = 0; v0 < V; v0 += d.l)   // l divides V: whole copies, no modulo per value
          std::copy_n(u + t * d.mid() + a * d.l, d.l, pattern + (t * d.r + a) * V + v0);
    z_src = pattern;
    z_token = d.r * V;
    z_a = V;
  }
  int64_t t = 0;
  for (; t + 4 <= tokens; t += 4)
    second_factor_block<acc_t, out_t, 4>(d, w2o, z_src + t * z_token, z_token, z_a, z_moves, y + t * y_row, y_row);
  for (; t < tokens; ++t)
    second_factor_block<acc_t, out_t, 1>(d, w2o, z_src + t * z_token, z_token, z_a, z_moves, y + t * y_row, y_row);
}

// x's rows for one tile as acc_t: x itself when it already is, else a converted copy.
template <typename scalar_t, typename acc_t>
inline const acc_t* tile_x(const scalar_t* x, int64_t x_row, int64_t tokens, int64_t n,
                           std::vector<acc_t>& buffer, int64_t& row) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    row = x_row;
    return x;
  } else {
    convert_rows(x, x_row, tokens, n, buffer.data());
    row = n;
    return buffer.data();
  }
}

// A product whose output has fewer columns than this is done as dot products, else as AXPYs.
template <typename acc_t>
constexpr int64_t kWideOutput = kLanes<acc_t>;

// u[t·(k·q) + i·q + a] = Σ_j W1[i, a, j] · x[t, i·p + j] for one tile (token-major).
template <typename scalar_t, typename acc_t>
inline void tile_u(const Dims& d, const Weights<scalar_t, acc_t>& w, const acc_t* x,
                   int64_t x_row, int64_t tokens, acc_t* u) {
  for (int64_t i = 0; i < d.k; ++i) {
    if (d.q >= kWideOutput<acc_t>)
      tokens_axpy_rows(tokens, d.q, d.p, x + i * d.p, 1, x_row, w.w1t.data() + i * d.p * d.q,
                       d.q, u + i * d.q, d.mid(), 1);
    else
      rows_dot_tokens(d.q, tokens, d.p, w.w1.data() + i * d.q * d.p, d.p, x + i * d.p, x_row,
                      u + i * d.q, 1, d.mid());
  }
}

// bf16 inputs with the first factor in dot form (narrow q) on a processor with AVX512-BF16: u comes
// from bf16 dot-product instructions on x and W1 as they lie (common/bf16_dot.h), not from fp32 copies.
template <typename scalar_t>
bool bf16_first_factor(const Dims& d) {
  return std::is_same_v<scalar_t, c10::BFloat16> && d.q < kWideOutput<float> && bf16_dot::available();
}

// u[t·(k·q) + i·q + a] = Σ_j W1[i, a, j] · x[t, i·p + j] for one tile, from bf16 x and W1.
template <typename scalar_t, typename acc_t>
void tile_u_bf16(const Dims& d, const scalar_t* w1, const scalar_t* x, int64_t x_row, int64_t tokens, acc_t* u) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    for (int64_t i = 0; i < d.k; ++i)
      bf16_dot::dot_rows(w1 + i * d.q * d.p, d.p, d.q, x + i * d.p, x_row, tokens, d.p, u + i * d.q, 1, d.mid());
  }
}

template <typename scalar_t>
void forward_typed(const monarch::ForwardArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int T = kTile;
  const Dims d = args.dims;
  const Weights<scalar_t, acc_t> w(args.w1, args.w2, d, /*for_forward=*/true);
  const scalar_t* x = args.x.const_data_ptr<scalar_t>();
  scalar_t* y = args.y.mutable_data_ptr<scalar_t>();
  const int64_t x_row = args.x.stride(0), y_row = args.y.stride(0);
  const int64_t tiles = (d.tokens + T - 1) / T;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / ((d.n() + d.out()) * T));
  const int64_t z_step = monarch::u_index_of_z(0, 1, d.l) - monarch::u_index_of_z(0, 0, d.l);
  const int64_t v_step = monarch::y_index_of_v(0, 1, d.l) - monarch::y_index_of_v(0, 0, d.l);

  const bool in_output_order = output_order<acc_t>(d);
  const bool bf16_u = bf16_first_factor<scalar_t>(d);
  const scalar_t* w1 = args.w1.const_data_ptr<scalar_t>();
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x_buf(std::is_same_v<scalar_t, acc_t> || bf16_u ? 0 : T * d.n());
    std::vector<acc_t> u(T * d.mid()), pattern(in_output_order ? T * d.r * kOutputStep<acc_t> : 0);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * T, tokens = std::min<int64_t>(T, d.tokens - t0);
      if (bf16_u) {
        tile_u_bf16(d, w1, x + t0 * x_row, x_row, tokens, u.data());
      } else {
        int64_t xr = 0;
        const acc_t* xt = tile_x(x + t0 * x_row, x_row, tokens, d.n(), x_buf, xr);
        tile_u(d, w, xt, xr, tokens, u.data());
      }
      if (in_output_order) {
        second_factor_in_output_order(d, w.w2o.data(), u.data(), tokens, pattern.data(), y + t0 * y_row, y_row);
        continue;
      }
      // Other l: y[m·l + c] = v_c[m] = Σ_a z_c[a] · W2[c, m, a], written through the shuffle.
      for (int64_t c = 0; c < d.l; ++c)
        tokens_axpy_rows(tokens, d.s, d.r, u.data() + monarch::u_index_of_z(c, 0, d.l), z_step,
                         d.mid(), w.w2t.data() + c * d.r * d.s, d.s,
                         y + t0 * y_row + monarch::y_index_of_v(c, 0, d.l), y_row, v_step);
    }
  });
}

template <typename scalar_t>
void backward_typed(const monarch::BackwardArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int T = kTile;
  const Dims d = args.dims;
  const Weights<scalar_t, acc_t> w(args.w1, args.w2, d, /*for_forward=*/false);
  const scalar_t* x = args.x.const_data_ptr<scalar_t>();
  const scalar_t* gy = args.grad_y.const_data_ptr<scalar_t>();
  scalar_t* gx = args.grad_x.mutable_data_ptr<scalar_t>();
  const int64_t x_row = args.x.stride(0), gy_row = args.grad_y.stride(0);
  const int64_t gx_row = args.grad_x.stride(0);
  const int64_t tiles = (d.tokens + T - 1) / T;
  const int64_t w1_size = d.k * d.q * d.p, w2_size = d.l * d.s * d.r;
  const bool bf16_u = bf16_first_factor<scalar_t>(d);
  const scalar_t* w1 = args.w1.const_data_ptr<scalar_t>();

  // One weight-gradient accumulator per chunk of tiles (not per thread), so the result does not
  // depend on scheduling: chunk boundaries depend only on the sizes and the thread count.
  // grad W2 accumulates as [c][a][m], like w.w2t, and is transposed back at the end.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(tiles, at::get_num_threads()));
  std::vector<acc_t> gw1(chunks * w1_size, acc_t(0)), gw2t(chunks * w2_size, acc_t(0));

  const int64_t z_step = monarch::u_index_of_z(0, 1, d.l) - monarch::u_index_of_z(0, 0, d.l);

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> x_buf(std::is_same_v<scalar_t, acc_t> ? 0 : T * d.n());
    std::vector<acc_t> u(T * d.mid()), gu(T * d.mid()), gv(T * d.out());
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* gw1_chunk = gw1.data() + chunk * w1_size;
      acc_t* gw2t_chunk = gw2t.data() + chunk * w2_size;
      for (int64_t tile = chunk * tiles / chunks; tile < (chunk + 1) * tiles / chunks; ++tile) {
        const int64_t t0 = tile * T, tokens = std::min<int64_t>(T, d.tokens - t0);
        int64_t xr = 0;
        const acc_t* xt = tile_x(x + t0 * x_row, x_row, tokens, d.n(), x_buf, xr);
        if (bf16_u)   // recomputed, not saved by the forward
          tile_u_bf16(d, w1, x + t0 * x_row, x_row, tokens, u.data());
        else
          tile_u(d, w, xt, xr, tokens, u.data());
        group_by_block(d, gy + t0 * gy_row, gy_row, tokens, gv.data());  // gv[t][c·s + m]
        for (int64_t c = 0; c < d.l; ++c) {
          const acc_t* gv_c = gv.data() + c * d.s;
          const int64_t z_c = monarch::u_index_of_z(c, 0, d.l);
          // grad z_c[a] = Σ_m W2[c, m, a] · grad v_c[m], stored at grad u[a·l + c]
          if (d.r >= kWideOutput<acc_t>)
            tokens_axpy_rows(tokens, d.r, d.s, gv_c, 1, d.out(), w.w2.data() + c * d.s * d.r, d.r,
                             gu.data() + z_c, d.mid(), z_step);
          else
            rows_dot_tokens(d.r, tokens, d.s, w.w2t.data() + c * d.r * d.s, d.s, gv_c, d.out(),
                            gu.data() + z_c, z_step, d.mid());
          // grad W2[c, m, a] += Σ_t z_c[a] · grad v_c[m]   (as [c][a][m])
          accumulate_outer(d.r, tokens, d.s, u.data() + z_c, z_step, d.mid(), gv_c, d.out(),
                           gw2t_chunk + c * d.r * d.s, d.s);
        }
        for (int64_t i = 0; i < d.k; ++i) {
          const acc_t* gu_i = gu.data() + i * d.q;
          // grad x[i·p + j] = Σ_a grad u[i·q + a] · W1[i, a, j]
          tokens_axpy_rows(tokens, d.p, d.q, gu_i, 1, d.mid(), w.w1.data() + i * d.q * d.p, d.p,
                           gx + t0 * gx_row + i * d.p, gx_row, 1);
          // grad W1[i, a, j] += Σ_t grad u[i·q + a] · x[i·p + j]
          accumulate_outer(d.q, tokens, d.p, gu_i, 1, d.mid(), xt + i * d.p, xr,
                           gw1_chunk + i * d.q * d.p, d.p);
        }
      }
    }
  });

  // Sum the chunks' shares; grad W2 also goes from [c][a][m] back to [c][m][a].
  scalar_t* out_w1 = args.grad_w1.mutable_data_ptr<scalar_t>();
  scalar_t* out_w2 = args.grad_w2.mutable_data_ptr<scalar_t>();
  auto sum_chunks = [&](const std::vector<acc_t>& parts, int64_t size, int64_t e) {
    acc_t sum = 0;
    for (int64_t c = 0; c < chunks; ++c) sum += parts[c * size + e];
    return sum;
  };
  at::parallel_for(0, w1_size, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) out_w1[e] = static_cast<scalar_t>(sum_chunks(gw1, w1_size, e));
  });
  at::parallel_for(0, d.l * d.r, 16, [&](int64_t begin, int64_t end) {
    for (int64_t ca = begin; ca < end; ++ca) {
      const int64_t c = ca / d.r, a = ca % d.r;
      for (int64_t m = 0; m < d.s; ++m)
        out_w2[(c * d.s + m) * d.r + a] = static_cast<scalar_t>(sum_chunks(gw2t, w2_size, ca * d.s + m));
    }
  });
}

}  // namespace

void monarch_forward(const monarch::ForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(),
                                  "blockdiag_butterfly_multiply_cpu",
                                  [&] { forward_typed<scalar_t>(args); });
}

void monarch_backward(const monarch::BackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(),
                                  "blockdiag_butterfly_multiply_backward_cpu",
                                  [&] { backward_typed<scalar_t>(args); });
}

}  // namespace shammie::SHAMMIE_CPU_NAMESPACE

SHAMMIE_CPU_TARGET_END
