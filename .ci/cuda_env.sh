# Environment for building shammie's CUDA kernels against pip's CUDA torch on a machine whose
# CUDA toolkit lacks some headers (cusparse.h, ...) that the nvidia wheels carry. Source it
# inside the venv that has the CUDA build of torch.
SITE=$(python -c "import site; print(site.getsitepackages()[0])")
if [ -z "${CUDA_TOOLKIT_ROOT_DIR:-}" ]; then
  for candidate in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
    if [ -n "$candidate" ] && [ -x "$candidate/bin/nvcc" ] && [ -d "$candidate/include" ]; then
      CUDA_TOOLKIT_ROOT_DIR=$candidate; break
    fi
  done
fi
export CUDA_TOOLKIT_ROOT_DIR
export CUDACXX=${CUDACXX:-$CUDA_TOOLKIT_ROOT_DIR/bin/nvcc}
NVRTC=$(ls "$SITE"/nvidia/cu13/lib/libnvrtc.so* "$SITE"/nvidia/cuda_nvrtc/lib/libnvrtc.so* 2>/dev/null | head -n 1 || true)
export CUDA_nvrtc_LIBRARY=${CUDA_nvrtc_LIBRARY:-$NVRTC}
for inc in "$SITE"/nvidia/cu13/include "$SITE"/nvidia/*/include; do
  [ -d "$inc" ] && export CPATH="$inc${CPATH:+:$CPATH}"
done
