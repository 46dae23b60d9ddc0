// AVX512-BF16 products (see bf16_dot.h): the packed GEMM tile and rows of dot products. Compiled
// once; the kernel functions carry their own target attribute and run only after available() has
// checked the processor.
#include "common/bf16_dot.h"

#include <cstring>

#include "common/cpu_isa.h"

// GCC 11 / Clang 12 and later know the avx512bf16 target and __builtin_cpu_supports("avx512bf16").
#if (defined(__x86_64__) || defined(_M_X64)) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define SHAMMIE_HAS_BF16_DOT 1
#include <immintrin.h>
#define SHAMMIE_BF16_DOT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))
#endif

namespace shammie::bf16_dot {

int64_t padded_columns(int64_t n) { return (n + 15) / 16 * 16; }
int64_t packed_words(int64_t K, int64_t n) { return (K + 1) / 2 * padded_columns(n); }

#if defined(SHAMMIE_HAS_BF16_DOT)
namespace {

// Rows per micro-tile. MR rows × NR·16 columns of fp32 sums stay in registers: 6 × 4 = 24 of the 32
// zmm registers, plus NR for the packed tile and one for the broadcast pair of x.
constexpr int kRows = 6;

// One pair step of an MR × NR·16 micro-tile: broadcast x's pair p (one 32-bit word) of each row and
// vdpbf16ps it against each 16-column slice of the packed pair row. The odd-K tail pairs x[K-1] with
// zero instead of reading the word past the row (past the buffer, or a NaN of the next row).
template <int MR, int NR, bool kOddTail>
SHAMMIE_BF16_DOT_TARGET __attribute__((always_inline)) inline void pair_step(__m512 (&acc)[MR][NR],
                                                                            const uint16_t* x, int64_t K,
                                                                            int64_t p, const uint32_t* wp) {
  __m512bh w[NR];
#pragma GCC unroll 4
  for (int j = 0; j < NR; ++j) w[j] = (__m512bh)_mm512_loadu_si512(wp + 16 * j);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    int32_t pair;
    if constexpr (kOddTail) {
      pair = static_cast<int32_t>(x[r * K + K - 1]);
    } else {
      std::memcpy(&pair, x + r * K + 2 * p, sizeof(pair));
    }
    const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, w[j]);
  }
}

// MR rows × NR·16 columns over all of K, written to out (row stride ld).
template <int MR, int NR>
SHAMMIE_BF16_DOT_TARGET void micro_tile(const uint16_t* x, int64_t K, const uint32_t* packed, int64_t ld,
                                        float* out) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  for (int64_t p = 0; p < pairs; ++p) pair_step<MR, NR, false>(acc, x, K, p, packed + p * ld);
  if (K & 1) pair_step<MR, NR, true>(acc, x, K, pairs, packed + pairs * ld);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(out + r * ld + 16 * j, acc[r][j]);
}

// All rows against one NR·16-column slice; the slice of the packed tile stays in cache meanwhile.
template <int NR>
SHAMMIE_BF16_DOT_TARGET void column_slice(const uint16_t* x, int64_t rows, int64_t K, const uint32_t* packed,
                                          int64_t ld, float* out) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) micro_tile<kRows, NR>(x + r * K, K, packed, ld, out + r * ld);
  for (; r < rows; ++r) micro_tile<1, NR>(x + r * K, K, packed, ld, out + r * ld);
}

SHAMMIE_BF16_DOT_TARGET void pack_avx512(const uint16_t* w, int64_t ldw, const int64_t* ids, int64_t c0,
                                         int64_t K, int64_t n, uint32_t* packed) {
  const int64_t ld = padded_columns(n);
  for (int64_t p = 0; p < (K + 1) / 2; ++p) {
    const uint16_t* lo = w + 2 * p * ldw;
    const uint16_t* hi = 2 * p + 1 < K ? lo + ldw : nullptr;
    uint32_t* d = packed + p * ld;
    if (ids) {
      const int64_t* id = ids + c0;
      for (int64_t c = 0; c < n; ++c) d[c] = lo[id[c]] | (hi ? static_cast<uint32_t>(hi[id[c]]) << 16 : 0u);
    } else if (hi) {
      for (int64_t c = 0; c < n; ++c) d[c] = lo[c0 + c] | static_cast<uint32_t>(hi[c0 + c]) << 16;
    } else {
      for (int64_t c = 0; c < n; ++c) d[c] = lo[c0 + c];
    }
    for (int64_t c = n; c < ld; ++c) d[c] = 0;
  }
}

SHAMMIE_BF16_DOT_TARGET void gemm_avx512(const uint16_t* x, int64_t rows, int64_t K, const uint32_t* packed,
                                         int64_t n, float* out) {
  const int64_t ld = padded_columns(n);
  int64_t c = 0;
  for (; c + 64 <= ld; c += 64) column_slice<4>(x, rows, K, packed + c, ld, out + c);
  switch ((ld - c) / 16) {
    case 3: column_slice<3>(x, rows, K, packed + c, ld, out + c); break;
    case 2: column_slice<2>(x, rows, K, packed + c, ld, out + c); break;
    case 1: column_slice<1>(x, rows, K, packed + c, ld, out + c); break;
    default: break;
  }
}

// R rows × U tokens of dot products over K, 32 bf16 (16 pairs) per step; the last step loads under a
// mask, so nothing past a row is read. Each sum ends in one horizontal add.
template <int R, int U>
SHAMMIE_BF16_DOT_TARGET void dot_block(const uint16_t* w, int64_t w_row, const uint16_t* x, int64_t x_row, int64_t K,
                                       float* out, int64_t out_o, int64_t out_t) {
  __m512 acc[R][U];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
  for (int64_t j = 0; j < K; j += 32) {
    const __mmask32 m = K - j >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - j)) - 1;
    __m512bh xv[U];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) xv[u] = (__m512bh)_mm512_maskz_loadu_epi16(m, x + u * x_row + j);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w + r * w_row + j);
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) acc[r][u] = _mm512_dpbf16_ps(acc[r][u], wv, xv[u]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) out[r * out_o + u * out_t] = _mm512_reduce_add_ps(acc[r][u]);
}

template <int R>
SHAMMIE_BF16_DOT_TARGET void dot_tokens(const uint16_t* w, int64_t w_row, const uint16_t* x, int64_t x_row,
                                        int64_t tokens, int64_t K, float* out, int64_t out_o, int64_t out_t) {
  int64_t t = 0;
  for (; t + 2 <= tokens; t += 2) dot_block<R, 2>(w, w_row, x + t * x_row, x_row, K, out + t * out_t, out_o, out_t);
  for (; t < tokens; ++t) dot_block<R, 1>(w, w_row, x + t * x_row, x_row, K, out + t * out_t, out_o, out_t);
}

SHAMMIE_BF16_DOT_TARGET void dot_rows_avx512(const uint16_t* w, int64_t w_row, int64_t rows, const uint16_t* x,
                                             int64_t x_row, int64_t tokens, int64_t K, float* out, int64_t out_o,
                                             int64_t out_t) {
  int64_t o = 0;
  for (; o + 4 <= rows; o += 4) dot_tokens<4>(w + o * w_row, w_row, x, x_row, tokens, K, out + o * out_o, out_o, out_t);
  for (; o < rows; ++o) dot_tokens<1>(w + o * w_row, w_row, x, x_row, tokens, K, out + o * out_o, out_o, out_t);
}

}  // namespace

bool available() {
  static const bool cpu_has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
                              __builtin_cpu_supports("fma");
  return cpu_has && cpu_isa() == CpuIsa::avx512;
}

void pack(const c10::BFloat16* w, int64_t ldw, const int64_t* ids, int64_t c0, int64_t K, int64_t n,
          uint32_t* packed) {
  pack_avx512(reinterpret_cast<const uint16_t*>(w), ldw, ids, c0, K, n, packed);
}

void gemm(const c10::BFloat16* x, int64_t rows, int64_t K, const uint32_t* packed, int64_t n, float* out) {
  gemm_avx512(reinterpret_cast<const uint16_t*>(x), rows, K, packed, n, out);
}

void dot_rows(const c10::BFloat16* w, int64_t w_row, int64_t rows, const c10::BFloat16* x, int64_t x_row,
              int64_t tokens, int64_t K, float* out, int64_t out_o, int64_t out_t) {
  dot_rows_avx512(reinterpret_cast<const uint16_t*>(w), w_row, rows, reinterpret_cast<const uint16_t*>(x), x_row,
                  tokens, K, out, out_o, out_t);
}

#else  // not x86-64, or an older compiler: never available, and the callers never reach these.

bool available() { return false; }
void pack(const c10::BFloat16*, int64_t, const int64_t*, int64_t, int64_t, int64_t, uint32_t*) {}
void gemm(const c10::BFloat16*, int64_t, int64_t, const uint32_t*, int64_t, float*) {}
void dot_rows(const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t, int64_t, float*, int64_t,
              int64_t) {}

#endif

}  // namespace shammie::bf16_dot
