#!/usr/bin/env bash
# One run on a lent GPU machine (python3 with torch + CUDA, nvcc, pytest-benchmark
# preinstalled; no internet): build pyattn with CUDA, run the tests (GPU cases
# included), run the benchmarks, and write the results under $OUT:
#   $OUT/info.txt  $OUT/tests.log  $OUT/bench.json  $OUT/results.md  $OUT/gpu_check.log
# Budget: about 8 minutes. Usage: OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
exec > >(tee "$OUT/gpu_check.log") 2>&1
start=$SECONDS
step() { echo; echo "== $* ($(( SECONDS - start )) s)"; }
status=0

step "build (CUDA, this GPU's arch only)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
arch=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
PYATTN_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 \
  timeout 300 $PY -m pip install --no-build-isolation --no-deps --no-index -v -e . \
  > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -40 "$OUT/build.log"; exit 1; }
grep "pyattn build:" "$OUT/build.log" || true
$PY -m pyattn info | tee "$OUT/info.txt"

step "tests"
timeout 240 $PY -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "benchmarks"
timeout 240 $PY -m pytest benchmarks -q -p no:cacheprovider --benchmark-only \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=median,rounds 2>&1 | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
[ -f "$OUT/bench.json" ] && $PY benchmarks/summarize.py "$OUT/bench.json" | tee "$OUT/results.md"

step "done, status $status"
exit $status
