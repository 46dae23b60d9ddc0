// SHAMMIE_HD marks the per-element math that the CPU and CUDA kernels share (one definition, so the
// CPU tests exercise the same math the GPU runs).
#pragma once

#if defined(__CUDACC__)
#define SHAMMIE_HD __host__ __device__ __forceinline__
#else
#define SHAMMIE_HD inline
#endif

// Fully unrolls a loop with a compile-time trip count in device code (so that a thread's small
// arrays stay in registers); host compilers unroll such loops on their own.
#if defined(__CUDACC__)
#define SHAMMIE_UNROLL _Pragma("unroll")
#else
#define SHAMMIE_UNROLL
#endif
