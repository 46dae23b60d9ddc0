// SHAMMIE_HD marks the per-element math that the CPU and CUDA kernels share (one definition, so the
// CPU tests exercise the same math the GPU runs).
#pragma once

#if defined(__CUDACC__)
#define SHAMMIE_HD __host__ __device__ __forceinline__
#else
#define SHAMMIE_HD inline
#endif
