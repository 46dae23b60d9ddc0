// The shammie._C Python module: declares the `shammie` op namespace and exposes what the module
// was built with. Each op family adds its schemas with TORCH_LIBRARY_FRAGMENT in its own file.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "common/cpu_isa.h"
#include "common/bf16_dot.h"
#include "shammie_build_info.h"

TORCH_LIBRARY(shammie, m) {}

PYBIND11_MODULE(_C, m) {
  m.doc() = "shammie's compiled kernels; the ops are registered as torch.ops.shammie.*";
  pybind11::dict info;
  info["shammie_version"] = SHAMMIE_VERSION_STRING;
  info["torch_version"] = SHAMMIE_BUILT_TORCH_VERSION;
  info["torch_cuda_version"] = SHAMMIE_BUILT_TORCH_CUDA_VERSION;
#if defined(SHAMMIE_WITH_CUDA)
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_compiler_version"] = SHAMMIE_CUDA_COMPILER_VERSION;
  info["cuda_archs"] = SHAMMIE_CUDA_ARCH_STRING;
  m.attr("build_info") = info;
  m.def("cpu_isa", [] { return shammie::cpu_isa_name(shammie::cpu_isa()); },
        "The CPU kernel copy that runs on this processor (capped by SHAMMIE_CPU_ISA).");
  m.def("cpu_bf16_dot", [] { return shammie::bf16_dot::available(); },
        "Whether bf16 Fréchet search runs on AVX512-BF16 dot products here (capped by SHAMMIE_CPU_ISA).");
}
