#!/usr/bin/env bash
# The one command to run on a GPU machine (an H100): build for sm_90 with all cores, run every
# CUDA test, the CUDA benchmarks, and compute-sanitizer memcheck and racecheck on small cases, in that
# order of value. Logs and JSON go to $OUT (or ./device-check-out). On the H200 (2026-11-27) the steps
# took about 70-90 s (build), 55 s (tests), 40 s (both implementations; now the Mamba-2 scan's two
# first, and three for Monarch), 100 s (benchmarks), 40 s (sanitizer); their limits (200, 170, 150,
# 200, 75, 60 s; SHAMMIE_T_* to change) are generous, so give the device tool's run timeout_s 600
# and expect about 7 minutes (the benchmarks now also time mamba_ssm and causal-conv1d where their
# wheels travel in .whl/peers/; the host-overhead and MoRe-profile steps after them, added in session
# 17 and not yet run on a GPU, are capped at 60 s each).
#   usage: bash benchmarks/device_check.sh
# A rerun after fixes can narrow it: SHAMMIE_CHECK_STEPS="tests sanitizer" (any of probe, tests,
# impls, bench, sanitizer, racecheck), SHAMMIE_CHECK_TESTS="tests/test_monarch.py -k cuda" (pytest's
# arguments), SHAMMIE_CHECK_BENCH="--ops monarch frechet" (shammie bench's), SHAMMIE_CHECK_SANITIZE=
# "monarch frechet" and SHAMMIE_CHECK_RACECHECK="ssd" (benchmarks/sanitizer_cases.py's families).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() { echo "== $1"; }
STEPS=${SHAMMIE_CHECK_STEPS:-tests impls bench sanitizer racecheck}
wants() { [[ " $STEPS " == *" $1 "* ]]; }
# Step time limits in seconds, each overridable (SHAMMIE_T_TESTS=120 ...) to fit what is left of a lease.
T_BUILD=${SHAMMIE_T_BUILD:-200} T_TESTS=${SHAMMIE_T_TESTS:-170} T_IMPLS=${SHAMMIE_T_IMPLS:-150}
T_BENCH=${SHAMMIE_T_BENCH:-200} T_SANITIZER=${SHAMMIE_T_SANITIZER:-75} T_RACECHECK=${SHAMMIE_T_RACECHECK:-60}

step "environment" | tee "$OUT/summary.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/summary.log"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/summary.log"

# Python packages the machine lacks travel as wheels in .whl/ (see the device tool's README):
# pytest (with iniconfig, pluggy) where missing, mambapy for the selective-scan peer. No network there.
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# The issue's own CUDA peers, mamba_ssm and causal-conv1d, as wheels built for sm_90 against the
# machine's torch 2.11 + CUDA 13.0 and Python 3.12 (how: RESULTS.md, "Peer wheels"), with einops, in
# .whl/peers/. They go on the path of the benchmarks only: with them importable, transformers' Mamba
# switches to their kernels, and the tests compare against transformers' torch path.
PEERS_SITE=
if ls .whl/peers/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers-site .whl/peers/*.whl \
    && PEERS_SITE=/tmp/peers-site
fi
# WordNet's noun file for Loki's real-data tests and benchmark, where the machine lacks wordnet-base:
# carried in .devdata/wordnet/ (ignored by git: `mkdir -p .devdata/wordnet && xz -9c
# /usr/share/wordnet/data.noun > .devdata/wordnet/data.noun.xz`, 15 MB down to 3, which leaves the
# peers' wheels room in the carry's 64 MiB; then name .devdata in the device tool's carry).
if [ -f .devdata/wordnet/data.noun.xz ] && [ ! -f .devdata/wordnet/data.noun ]; then
  python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.devdata/wordnet/data.noun.xz'), open('.devdata/wordnet/data.noun', 'wb'))"
fi
[ -f .devdata/wordnet/data.noun ] && export WNSEARCHDIR=$PWD/.devdata/wordnet
python3 -c "import pytest" 2>/dev/null || {
  echo "pytest is not installed here: carry its wheels (pytest, iniconfig, pluggy) in .whl/" | tee -a "$OUT/summary.log"; status=1; }

step "build (sm_90, all cores)" | tee -a "$OUT/summary.log"
export SHAMMIE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc)
SECONDS=0
# If the plain build fails (say, the toolkit there lacks headers the nvidia wheels carry), try again
# the way CI builds: CMake directly, with .ci/cuda_env.sh's paths, and a checkout symlink for
# shammie.benchmarks in place of the editable install's mapping.
timeout "$T_BUILD" python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || {
  echo "plain build failed after ${SECONDS}s; retrying with .ci/cuda_env.sh" | tee -a "$OUT/summary.log"
  tail -15 "$OUT/build.log" | tee -a "$OUT/summary.log"
  ( source .ci/cuda_env.sh && cmake -S . -B build-fallback -G Ninja -DPython_EXECUTABLE="$(command -v python3)" \
      -DSHAMMIE_CUDA=1 -DTORCH_CUDA_ARCH_LIST=9.0 -DSHAMMIE_OUTPUT_DIR="$PWD/shammie" \
      -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_TOOLKIT_ROOT_DIR" -DCUDA_nvrtc_LIBRARY="$CUDA_nvrtc_LIBRARY" \
    && timeout "$T_BUILD" cmake --build build-fallback --parallel "$MAX_JOBS" ) > "$OUT/build_fallback.log" 2>&1 || {
    echo "BUILD FAILED (see build.log, build_fallback.log)" | tee -a "$OUT/summary.log"
    tail -40 "$OUT/build_fallback.log"; exit 1; }
  ln -sfn ../benchmarks shammie/benchmarks
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
}
echo "built in ${SECONDS}s" | tee -a "$OUT/summary.log"
# cpp_errors (in shammie info) is the first line to read: see RESULTS.md, "CUDA: NVIDIA H200". The
# host compiler, the module's unwind-table header and any linker complaint about .eh_frame go with it.
python3 -m shammie info | tee -a "$OUT/summary.log"
{ c++ --version | head -1; readelf -lW shammie/_C*.so | grep -E "GNU_EH_FRAME" || echo "no GNU_EH_FRAME header";
  grep -i "eh_frame" "$OUT/build.log" | head -5; } 2>&1 | tee -a "$OUT/summary.log"

if wants probe; then
  step "C++ error probe" | tee -a "$OUT/summary.log"
  timeout 40 python3 benchmarks/cpp_error_probe.py 2>&1 | tee -a "$OUT/summary.log"
fi

# The CUDA variants only (CI runs the CPU suite); keep going past failures to see them all. Eight
# pytest-xdist workers share the GPU (the tests are small); a worker whose CUDA context a kernel
# fault poisoned exits (tests/conftest.py) and xdist starts a fresh one.
if wants tests; then
  step "CUDA tests" | tee -a "$OUT/summary.log"
  PARALLEL=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8 --max-worker-restart 40")
  TIMEOUT=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 90")
  # shellcheck disable=SC2086
  # Two intra-op threads per worker: the float64 references run on the CPU, and eight workers each
  # spinning up every core's worth of OpenMP threads starved one another (the first H200 run).
  OMP_NUM_THREADS=2 timeout "$T_TESTS" python3 -m pytest ${SHAMMIE_CHECK_TESTS:-tests -k cuda} -q $PARALLEL $TIMEOUT \
    -p no:cacheprovider -p no:benchmark --durations=15 --maxfail=60 -rfEs > "$OUT/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)|crashed|passed|failed" "$OUT/tests.log" | tail -40 | tee -a "$OUT/summary.log"
fi

if wants impls; then
  step "every implementation of the Mamba-2 scan, Monarch and Frechet, side by side" | tee -a "$OUT/summary.log"
  timeout "$T_IMPLS" python3 -m shammie.benchmarks.impl_compare --device cuda 2>&1 | tee "$OUT/impls.log" \
    | tee -a "$OUT/summary.log" || status=1
fi

if wants bench; then
  step "CUDA benchmarks" | tee -a "$OUT/summary.log"
  python3 benchmarks/copy_bandwidth.py | tee -a "$OUT/summary.log" || status=1
  BENCH_PATH=${PEERS_SITE:+$PEERS_SITE:}${PYTHONPATH:-}
  PYTHONPATH=$BENCH_PATH python3 -c "import mamba_ssm, causal_conv1d; print('peers: mamba_ssm', \
    mamba_ssm.__version__, '/ causal_conv1d', causal_conv1d.__version__)" 2>&1 | tail -1 | tee -a "$OUT/summary.log"
  # shellcheck disable=SC2086
  PYTHONPATH=$BENCH_PATH timeout "$T_BENCH" python3 -m shammie bench --device cuda ${SHAMMIE_CHECK_BENCH:-} \
    --json "$OUT/bench_cuda.json" > "$OUT/bench_cuda.log" 2>&1 || status=1
  grep -v "^  measured" "$OUT/bench_cuda.log" | tee -a "$OUT/summary.log"
  # Host cost per call, and where a MoRe layer's step goes (host or kernels; issue 3).
  PYTHONPATH=$BENCH_PATH timeout 60 python3 -m shammie.benchmarks.host_overhead --device cuda --calls 1000 2>&1 \
    | tee -a "$OUT/summary.log" || status=1
  PYTHONPATH=$BENCH_PATH timeout 60 python3 -m shammie.benchmarks.more_profile --device cuda 2>&1 \
    | grep -v "^USDT" | tee -a "$OUT/summary.log" || status=1
fi

if wants sanitizer; then
  step "compute-sanitizer memcheck, small cases" | tee -a "$OUT/summary.log"
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
  if [ -n "$SANITIZER" ]; then
    # Instrument shammie's kernels only (all in namespace shammie): torch's own would take the time.
    ONLY_OURS=$("$SANITIZER" --help 2>/dev/null | grep -q -- "--kernel-name " && echo "--kernel-name kns=shammie")
    # shellcheck disable=SC2086
    timeout "$T_SANITIZER" "$SANITIZER" --tool memcheck $ONLY_OURS --print-limit 20 --error-exitcode 3 \
      python3 benchmarks/sanitizer_cases.py ${SHAMMIE_CHECK_SANITIZE:-} > "$OUT/memcheck.log" 2>&1 || status=1
    grep -E "ERROR SUMMARY|Invalid|at 0x|by thread" "$OUT/memcheck.log" | head -20 | tee -a "$OUT/summary.log"
    tail -3 "$OUT/memcheck.log" | tee -a "$OUT/summary.log"
  else
    echo "compute-sanitizer not found" | tee -a "$OUT/summary.log"; status=1
  fi
fi

# Shared-memory races in the kernels that stage tiles (scan, SSD scan, conv1d backward), on their small
# cases: a missing barrier need not show in a test's numbers.
if wants racecheck; then
  step "compute-sanitizer racecheck, kernels with shared-memory tiles" | tee -a "$OUT/summary.log"
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
  if [ -n "$SANITIZER" ]; then
    ONLY_OURS=$("$SANITIZER" --help 2>/dev/null | grep -q -- "--kernel-name " && echo "--kernel-name kns=shammie")
    # shellcheck disable=SC2086
    SHAMMIE_SANITIZE_DTYPES=float32 timeout "$T_RACECHECK" "$SANITIZER" --tool racecheck $ONLY_OURS --print-limit 20 --error-exitcode 3 \
      python3 benchmarks/sanitizer_cases.py ${SHAMMIE_CHECK_RACECHECK:-conv1d selective_scan ssd} > "$OUT/racecheck.log" 2>&1 \
      || status=1
    grep -E "RACECHECK SUMMARY|ERROR SUMMARY|hazard|Race" "$OUT/racecheck.log" | head -20 | tee -a "$OUT/summary.log"
    tail -3 "$OUT/racecheck.log" | tee -a "$OUT/summary.log"
  else
    echo "compute-sanitizer not found" | tee -a "$OUT/summary.log"; status=1
  fi
fi

echo "device check exit status: $status" | tee -a "$OUT/summary.log"
exit $status
