#!/usr/bin/env bash
# The device run, on a fresh GPU machine, from the project root, in at most 8 minutes:
#   1. read the driver's CUDA version (nvidia-smi) and install tpmax with the matching extra
#      (cuda12 / cuda13) plus the test tools into a virtual environment ($VENV, default .venv);
#   2. the GPU tests: every kernel against its NumPy twin and every other test marked `gpu`
#      (pytest -m gpu), then tests/test_gpu_paths.py (HF fixtures vs the CPU reference, gpu:0
#      and gpu:0,0);
#   3. bench/kernel_bench.py (each decode kernel's achieved bandwidth at Llama-3-8B shapes), then
#      bench/gpu_decode.py (decode batch 1/8/64 and prefill on the Llama-3-8B shape).
# Every step runs under its own `timeout`; a failed step is recorded and the next one runs.
# Results (logs, JUnit XML, the benchmark JSON, and device_check.json with each step's exit
# status and seconds) go to one folder: $OUT if set, else bench/results/device/.
#
#   bash bench/device_check.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/device}"
VENV="${VENV:-.venv}"
mkdir -p "$OUT"
STEPS=()

# step NAME SECONDS CMD...: run CMD under `timeout`, output to $OUT/NAME.log, status recorded.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
  timeout --kill-after=5 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/$name.log"
  STEPS+=("{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - t0)), \"limit\": $limit}")
  return $rc
}

# 0. The device and the driver's CUDA version.
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
CUDA_MAJOR=$(sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' "$OUT/nvidia-smi.txt" | head -n 1)
case "$CUDA_MAJOR" in
  12) EXTRA=cuda12 ;;
  13) EXTRA=cuda13 ;;
  *) echo "no supported CUDA driver found (nvidia-smi says CUDA '${CUDA_MAJOR}'); see $OUT/nvidia-smi.txt"
     exit 2 ;;
esac
echo "driver CUDA $CUDA_MAJOR: installing the $EXTRA extra"

# 1. Install (pip's cache makes a rerun fast).
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
step install 150 "$PY" -m pip install -q -e ".[$EXTRA]" "pytest>=8" "hypothesis>=6.100" \
  nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12
"$PY" -c "import cupy, tpmax; print('cupy', cupy.__version__, 'gpus', tpmax.gpu_count())" >>"$OUT/install.log" 2>&1

# 2. GPU tests.
step gpu_tests 100 "$PY" -m pytest -q -rs -m gpu tests --junitxml="$OUT/gpu_tests.xml"
[ -f tests/test_gpu_paths.py ] && step gpu_paths 60 "$PY" -m pytest -q -rs tests/test_gpu_paths.py \
  --junitxml="$OUT/gpu_paths.xml"

# 3. The decode kernels alone (bandwidth per launch), then the decode / prefill benchmark.
step kernel_bench 45 "$PY" bench/kernel_bench.py --device gpu:0 --out "$OUT/kernel_bench.json"
step gpu_decode 100 "$PY" bench/gpu_decode.py --devices gpu:0 --out "$OUT/gpu_decode.json"

# Summary.
{
  echo "{\"cuda_driver_major\": $CUDA_MAJOR, \"extra\": \"$EXTRA\", \"date\": \"$(date -u +%FT%TZ)\","
  echo " \"git\": \"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\", \"steps\": ["
  (IFS=,; echo "  ${STEPS[*]}")
  echo "]}"
} >"$OUT/device_check.json"
cat "$OUT/device_check.json"
