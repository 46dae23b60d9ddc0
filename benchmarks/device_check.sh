#!/usr/bin/env bash
# The one command to run on a GPU machine (an H100): build for sm_90 with all cores, run every
# CUDA test, compute-sanitizer memcheck on small cases, and the CUDA benchmarks. Logs and JSON
# go to $OUT (or ./device-check-out). Step timeouts (tests 240 s, sanitizer 90 s, benchmarks 150 s,
# plus a build of about a minute on 16 cores) keep it within 8 minutes.
#   usage: bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() { echo "== $1"; }

step "environment" | tee "$OUT/summary.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/summary.log"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/summary.log"

# Python packages the machine lacks travel as wheels in .whl/ (see the device tool's README):
# pytest (with iniconfig, pluggy) for the tests, peft for the LoRA peer. Installed without network.
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -c "import pytest" 2>/dev/null || {
  echo "pytest is not installed here: carry its wheels (pytest, iniconfig, pluggy) in .whl/" | tee -a "$OUT/summary.log"; status=1; }

step "build (sm_90, all cores)" | tee -a "$OUT/summary.log"
export SHAMMIE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc)
SECONDS=0
timeout 180 python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || {
  echo "BUILD FAILED (see build.log)" | tee -a "$OUT/summary.log"; tail -40 "$OUT/build.log"; exit 1; }
echo "built in ${SECONDS}s" | tee -a "$OUT/summary.log"
python3 -m shammie info | tee -a "$OUT/summary.log"

# The CUDA variants only (CI runs the CPU suite); keep going past failures to see them all.
step "CUDA tests" | tee -a "$OUT/summary.log"
timeout 240 python3 -m pytest tests -q -k cuda --maxfail=30 -rs > "$OUT/tests.log" 2>&1 || status=1
tail -5 "$OUT/tests.log" | tee -a "$OUT/summary.log"

step "compute-sanitizer memcheck, small cases" | tee -a "$OUT/summary.log"
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ -n "$SANITIZER" ]; then
  timeout 90 "$SANITIZER" --tool memcheck --error-exitcode 3 python3 benchmarks/sanitizer_cases.py > "$OUT/memcheck.log" 2>&1 || status=1
  tail -3 "$OUT/memcheck.log" | tee -a "$OUT/summary.log"
else
  echo "compute-sanitizer not found" | tee -a "$OUT/summary.log"; status=1
fi

step "CUDA benchmarks" | tee -a "$OUT/summary.log"
timeout 150 python3 -m shammie bench --device cuda --json "$OUT/bench_cuda.json" > "$OUT/bench_cuda.log" 2>&1 || status=1
cat "$OUT/bench_cuda.log" | grep -v "^  measured" | tee -a "$OUT/summary.log"
python3 benchmarks/copy_bandwidth.py | tee -a "$OUT/summary.log" || status=1

echo "device check exit status: $status" | tee -a "$OUT/summary.log"
exit $status
