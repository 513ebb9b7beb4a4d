#!/usr/bin/env bash
# One run on a lent GPU machine, within 8 minutes including the build:
#   1. build pyattn with CUDA for this GPU's architecture only (MAX_JOBS=16);
#   2. the CUDA tests of each op, then every other CUDA test, without -x and
#      with PYATTN_REQUIRE_CUDA=1 PYATTN_REQUIRE_DATA=1 (a skip is a failure);
#   3. per op, the benchmark cases whose id contains "headline" (pyattn against
#      its PyTorch counterpart), one JSON report each;
#   4. $OUT/gpu_results.md: per step its pass/fail counts and time, then the
#      speed / memory tables against the machine's measured roofline.
# The machine: python3 with torch (CUDA) and triton, nvcc, pytest and
# pytest-benchmark; no network; data from the repository's data/ folder.
# Each step is capped with `timeout -s INT` (then KILL after $GRACE s): on
# SIGINT pytest prints its counts and pytest-benchmark writes its JSON with the
# cases finished so far (benchmarks/capped_pytest.py makes sure SIGINT reaches
# Python as KeyboardInterrupt). The caps are checked to add up to < 8 minutes.
# $OUT receives 6 files: gpu_check.log (everything printed), build.log,
# bench_<op>.json for each op, gpu_results.md.
#
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh [--dry-run]
# --dry-run (or GPU_CHECK_DRY_RUN=1), on a machine without a GPU: the budget
# check, the build with whatever torch is installed, --collect-only of every
# test and benchmark selection (an op whose CUDA test selection is empty or
# fails to collect is a failure), and the summary. PYTHON picks the
# interpreter (default python3).
set -uo pipefail
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
rm -f "$OUT"/bench_*.json "$OUT/gpu_results.md"  # never summarise an earlier run's figures
WORK=$(mktemp -d)  # per-step logs and the step table; $OUT keeps to few files
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_check.log") 2>&1

OPS=(padded_conv flash_attention spmm)
declare -A OP_TESTS=(
  [padded_conv]="tests/test_padded_conv*.py"
  [flash_attention]="tests/test_flash_attention*.py"
  [spmm]="tests/test_spmm*.py"
)
# Step caps in seconds; each may overrun by GRACE before KILL.
GRACE=5
BUDGET=470
CAP_ENV=10
CAP_BUILD=140
declare -A CAP_TESTS=([padded_conv]=35 [flash_attention]=80 [spmm]=35 [other]=15)
declare -A CAP_BENCH=([padded_conv]=30 [flash_attention]=30 [spmm]=30)
CAP_SUMMARY=10

total=$(( CAP_ENV + CAP_BUILD + CAP_SUMMARY + 3 * GRACE ))
for cap in "${CAP_TESTS[@]}" "${CAP_BENCH[@]}"; do total=$(( total + cap + GRACE )); done
echo "gpu_check: steps capped at $total s in all (budget $BUDGET s); dry run: $DRY_RUN; results in $OUT"
if (( total > BUDGET )); then
  echo "gpu_check: the step caps add up to $total s, over the $BUDGET s budget"; exit 2
fi

if (( DRY_RUN )); then
  # the dry run tests the steps, not their speed: a slow CPU machine gets room
  # (the CPU build alone took over 240 s on 2 cores of a slow host, 2026-11-29)
  dry_cap=${GPU_CHECK_DRY_CAP:-120}
  CAP_ENV=$dry_cap CAP_BUILD=$(( 5 * dry_cap )) CAP_SUMMARY=$dry_cap
  for key in "${!CAP_TESTS[@]}"; do CAP_TESTS[$key]=$dry_cap; done
  for key in "${!CAP_BENCH[@]}"; do CAP_BENCH[$key]=$dry_cap; done
fi
VERSIONS='import sys, importlib.metadata as m, torch, triton
print("Python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__,
      "| CUDA available:", torch.cuda.is_available(), "|", ", ".join(
      f"{p} {m.version(p)}" for p in ("pytest", "pytest-benchmark", "hypothesis")))'

start=$SECONDS
status=0
printf 'step\tcap_s\telapsed_s\texit\tlog\n' > "$WORK/steps.tsv"

# run_step NAME CAP EMPTY_OK COMMAND...: run COMMAND under its cap, output to the
# console and $WORK/NAME.log, one row in the step table. EMPTY_OK=1 accepts
# pytest's exit 5 (nothing selected).
run_step() {
  local name=$1 cap=$2 empty_ok=$3 t0=$SECONDS rc
  shift 3
  echo; echo "== $name (cap $cap s; at $(( SECONDS - start )) s)"
  timeout -s INT -k "$GRACE" "$cap" "$@" 2>&1 | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$cap" "$(( SECONDS - t0 ))" "$rc" "$WORK/$name.log" \
    >> "$WORK/steps.tsv"
  if (( rc != 0 )) && ! (( rc == 5 && empty_ok )); then status=1; fi
  return "$rc"
}

pytest_step() {  # pytest_step NAME CAP EMPTY_OK PYTEST_ARGS...
  local name=$1 cap=$2 empty_ok=$3
  shift 3
  local mode=()
  (( DRY_RUN )) && mode=(--collect-only)  # lists the selected node ids and their count
  run_step "$name" "$cap" "$empty_ok" "$PY" benchmarks/capped_pytest.py -q -p no:cacheprovider \
    -rfE --tb=short "${mode[@]}" "$@"
}

run_step env "$CAP_ENV" 0 bash -c "
  (( $DRY_RUN )) || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c '$VERSIONS'" || { echo "gpu_check: python / torch / triton unusable"; exit 1; }

if (( DRY_RUN )); then
  build_env="MAX_JOBS=$(nproc)"
else
  arch=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') \
    || { echo "gpu_check: no CUDA device visible to torch"; exit 1; }
  build_env="PYATTN_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=16"
fi
run_step build "$CAP_BUILD" 0 bash -c "
  env $build_env $PY -m pip install --no-build-isolation --no-deps --no-index -v -e . \
    > '$OUT/build.log' 2>&1 || { tail -40 '$OUT/build.log'; exit 1; }
  grep -h 'pyattn build:' '$OUT/build.log' | head -1
  $PY -m pyattn info"
built=$?

export PYATTN_REQUIRE_CUDA=1 PYATTN_REQUIRE_DATA=1
# no pairs added for steadiness (benchmarks/conftest.py): each bench step has
# 30 s for all of its headline cases
export PYATTN_BENCH_STEADY_S=0
if (( built == 0 )); then
  other_args=()
  for op in "${OPS[@]}"; do
    # shellcheck disable=SC2086  # the glob expands to the op's test files
    pytest_step "tests-$op" "${CAP_TESTS[$op]}" 0 -m requires_cuda ${OP_TESTS[$op]}
    for pattern in ${OP_TESTS[$op]}; do other_args+=(--ignore-glob="$pattern"); done
  done
  pytest_step tests-other "${CAP_TESTS[other]}" 1 -m requires_cuda tests "${other_args[@]}"
  for op in "${OPS[@]}"; do
    # a dry run collects on CPU, where a bench file may offer no GPU headline case
    pytest_step "bench-$op" "${CAP_BENCH[$op]}" "$DRY_RUN" "benchmarks/bench_$op.py" \
      -k headline --benchmark-only --benchmark-json="$OUT/bench_$op.json" \
      --benchmark-columns=median,rounds
  done
else
  echo "gpu_check: build failed; tests and benchmarks not run"
fi

reports=()
for op in "${OPS[@]}"; do reports+=("$OUT/bench_$op.json"); done
run_step summary "$CAP_SUMMARY" 0 "$PY" benchmarks/summarize.py --steps "$WORK/steps.tsv" \
  --output "$OUT/gpu_results.md" "${reports[@]}"
echo
cat "$OUT/gpu_results.md"
echo; echo "== done in $(( SECONDS - start )) s, status $status; results in $OUT"
exit $status
