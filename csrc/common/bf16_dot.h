// bf16 × bf16 → fp32 products on AVX512-BF16 (vdpbf16ps) for the CPU kernels: a GEMM tile for the
// Fréchet search, and rows of dot products for the Monarch product's first factor.
//
// Why our own: with bf16 inputs the kernels want fp32 sums (bf16 has 8 significant bits, too few to
// rank near-ties or to accumulate), and torch exposes no bf16 → fp32 matmul on CPU: at::mm rounds
// its output to bf16, and MKL's cblas_gemm_bf16bf16f32 converts to fp32 on processors it does not
// recognise (AMD), so it runs at fp32 speed. vdpbf16ps multiplies bf16 pairs exactly and accumulates
// in fp32 at twice the fp32 FMA rate. Like every AVX512-BF16 user it flushes denormal inputs and
// partial sums to zero.
//
// The GEMM's right-hand tile is packed once per label tile ("pairs": rows 2p and 2p + 1 of the K × n
// tile interleaved, so one 32-bit lane holds both factors of a pair) and reused for every row tile.
// Dot products need no packing: consecutive elements of both rows already form the pairs.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace shammie::bf16_dot {

// Columns are computed 16 at a time: the packed tile and the output rows are this many columns wide.
int64_t padded_columns(int64_t n);
// 32-bit words of a packed K × n tile.
int64_t packed_words(int64_t K, int64_t n);

// True when this build has the kernel, the processor runs AVX512-BF16, and SHAMMIE_CPU_ISA does not
// cap the CPU kernels below avx512 (so tests can compare against the portable path).
bool available();

// Packs the K × n tile of w (row stride ldw) whose columns are w[:, c0 + c], or w[:, ids[c0 + c]]
// when ids is given; columns n .. padded_columns(n) are zero. Only when available().
void pack(const c10::BFloat16* w, int64_t ldw, const int64_t* ids, int64_t c0, int64_t K, int64_t n,
          uint32_t* packed);

// out[r, c] = Σ_j x[r, j] · tile[j, c] in fp32 for r < rows, c < padded_columns(n); x is rows × K with
// row stride K, out has row stride padded_columns(n). Only when available().
void gemm(const c10::BFloat16* x, int64_t rows, int64_t K, const uint32_t* packed, int64_t n, float* out);

// out[o·out_o + t·out_t] = Σ_{j < K} w[o·w_row + j] · x[t·x_row + j] in fp32, for o < rows and
// t < tokens. Only when available().
void dot_rows(const c10::BFloat16* w, int64_t w_row, int64_t rows, const c10::BFloat16* x, int64_t x_row,
              int64_t tokens, int64_t K, float* out, int64_t out_o, int64_t out_t);

}  // namespace shammie::bf16_dot
