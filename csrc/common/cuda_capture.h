// Whether the current CUDA stream is capturing a graph. Host-side checks that copy a tensor to the
// host (and so synchronize) are not allowed then; the ops skip them and their kernels stay in bounds.
#pragma once

#include <c10/cuda/CUDAGraphsC10Utils.h>

namespace shammie::cuda {

inline bool stream_is_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

}  // namespace shammie::cuda
