// Dynamic shared memory past the 48 KiB default: a kernel must opt in, up to the device's limit.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "common/errors.h"

namespace shammie::cuda {

// The kernel's static shared arrays, in bytes (asked once per kernel).
template <auto kKernel>
size_t static_smem_bytes() {
  static const size_t bytes = [] {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kKernel));
    return attributes.sharedSizeBytes;
  }();
  return bytes;
}

// The most dynamic shared memory `kKernel` can take on the current device (after an opt-in).
template <auto kKernel>
size_t dynamic_smem_limit() {
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return size_t(optin) > static_smem_bytes<kKernel>() ? size_t(optin) - static_smem_bytes<kKernel>() : 0;
}

// Lets `kKernel` take `bytes` of dynamic shared memory on top of its static arrays (opting in when
// the two together pass 48 KiB; a clear error when the GPU allows less) and returns bytes. `what`
// names the op for that error.
template <auto kKernel>
size_t allow_dynamic_smem(size_t bytes, const char* what) {
  const size_t static_bytes = static_smem_bytes<kKernel>();
  if (static_bytes + bytes > (size_t(48) << 10)) {
    SHAMMIE_CHECK(bytes <= dynamic_smem_limit<kKernel>(), what, ": the kernel needs ", static_bytes + bytes,
                  " bytes of shared memory per block; this GPU allows ", static_bytes + dynamic_smem_limit<kKernel>());
    C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  return bytes;
}

}  // namespace shammie::cuda
