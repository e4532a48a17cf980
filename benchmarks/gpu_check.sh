#!/usr/bin/env bash
# The GPU check, as two device calls that each end well inside 6 minutes on an H100/H200 (no network;
# torch with CUDA, triton, pytest):
#   benchmarks/gpu_check.sh tests    build fdistill (with the CUDA extension), then the GPU-marked tests
#   benchmarks/gpu_check.sh bench    build if not built (the machine may be fresh), then the benchmarks
#   benchmarks/gpu_check.sh dry-run  the bench call on CPU, tiny shapes, no build: checks this script
# Versions (card, driver, torch, Triton, CUDA) are printed first. Everything is written under $OUT
# (default bench-out/), at most 8 files a call:
#   tests: gpu_tests.log, gpu_tests.xml (junit)
#   bench: gpu_bench.log, bench.md (every table), divergence.csv, fdiv.csv, fused_linear.csv
#   dry-run: the same as bench, its log gpu_dry_run.log
# A failing step is recorded, not fatal: the next one runs, the summary at the end lists each step,
# and the exit status is non-zero if any failed. Each step runs under a timeout that keeps the call
# inside GPU_CHECK_BUDGET_S seconds (default 320 for tests, 285 for bench), and the benchmarks skip
# (cell "skipped") what would not fit; they rewrite their tables after every row, so a step cut
# short keeps its rows.
#
# Liger-Kernel, a baseline, is installed from .whl/ when present (no network there). .whl/ is not
# committed; fetch the wheel on a machine with network (liger-kernel is pure Python), then carry .whl:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl liger-kernel==0.8.5
# On the lent GPU machine: `benchmarks/gpu_check.sh tests`, then `benchmarks/gpu_check.sh bench`, each
# a device call of its own (timeout 360 s) carrying .whl.
# Environment: PYTHON (default python3), OUT, GPU_CHECK_BUDGET_S, MAX_JOBS (default 16),
# GPU_CHECK_DRY_TOKENS (dry-run token counts, default "2 1").
set -uo pipefail # no -e: every step runs and the summary is always printed
cd "$(dirname "$0")/.."

MODE=${1:-}
case "$MODE" in
  tests | bench | dry-run) ;;
  *)
    echo "usage: $0 tests|bench|dry-run" >&2
    exit 2
    ;;
esac
PY=${PYTHON:-python3}
OUT=${OUT:-bench-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export OUT PYTHONUNBUFFERED=1
LOG="$OUT/gpu_${MODE//-/_}.log"
BUDGET=${GPU_CHECK_BUDGET_S:-$([[ $MODE == tests ]] && echo 320 || echo 285)} # seconds for the whole call
START=$SECONDS
SUMMARY=()
STATUS=0

left() { echo $((BUDGET - (SECONDS - START))); }
min() { echo $(($1 < $2 ? $1 : $2)); }

# step NAME LIMIT_S COMMAND...: COMMAND under a timeout (SIGINT first: pytest still writes its report),
# its status recorded.
step() {
  local name=$1 limit=$2 rc=0 t0=$SECONDS
  shift 2
  if ((limit < 15)); then
    SUMMARY+=("$name: skipped (time budget spent)")
    STATUS=1
    return 1
  fi
  echo
  echo "== $name (limit ${limit}s, $(left)s left of the call's budget)"
  timeout -s INT -k 15 "$limit" "$@" || rc=$?
  local verdict="ok"
  ((rc == 0)) || verdict="FAILED (exit $rc$( ((rc == 124)) && echo ", timed out"))"
  SUMMARY+=("$name: $verdict, $((SECONDS - t0))s")
  ((rc == 0)) || STATUS=1
  return "$rc"
}

versions() {
  echo "== versions"
  "$PY" -c "from benchmarks.harness import environment_lines; print(*environment_lines(), sep='\n')"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  return 0
}

built() { # the extension imports and has CUDA kernels wherever nvcc could build them
  "$PY" -c "import sys, fdistill; from torch.utils.cpp_extension import CUDA_HOME
sys.exit(0 if fdistill.has_cpu_kernels() and (fdistill.has_cuda_kernels() or CUDA_HOME is None) else 1)" 2>/dev/null
}

build() {
  # Only this card's architecture: half the nvcc time of the default "8.0;9.0+PTX".
  local arch
  arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
  export FDISTILL_CUDA_ARCHS=${FDISTILL_CUDA_ARCHS:-${arch:-8.0;9.0+PTX}} MAX_JOBS=${MAX_JOBS:-16}
  echo "building for CUDA architectures $FDISTILL_CUDA_ARCHS with MAX_JOBS=$MAX_JOBS"
  step "build (pip install -e .)" "$(min 240 $(($(left) - 30)))" \
    "$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e . ||
    step "build (setup.py build_ext --inplace)" "$(min 240 $(($(left) - 30)))" \
      "$PY" setup.py -q build_ext --inplace
  "$PY" -c "import fdistill; print('fdistill: CPU kernels', fdistill.has_cpu_kernels(), '- CUDA kernels',
fdistill.has_cuda_kernels())" || true
}

liger_wheels() {
  shopt -s nullglob
  local wheels=(.whl/*.whl)
  shopt -u nullglob
  if ((${#wheels[@]} == 0)); then
    echo "no .whl/*.whl: Liger rows will be dropped unless liger-kernel is installed"
    return 0
  fi
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "${wheels[@]}"; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    echo "installed ${wheels[*]} into /tmp/site"
  else
    echo "installing ${wheels[*]} failed: Liger rows will be dropped"
  fi
}

run_tests() {
  versions
  build
  step "GPU tests (pytest -m gpu)" "$(($(left) - 10))" \
    "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider --tb=short -rfE --durations=15 \
    --junitxml="$OUT/gpu_tests.xml" -o junit_family=xunit2
}

run_bench() {
  local dry=() main_tokens=(8192 1024) compile_tokens=(8192) gpu=(--device cuda)
  if [[ $MODE == dry-run ]]; then
    export TRITON_INTERPRET=1 # Triton's interpreter runs the kernels on CPU tensors
    read -ra main_tokens <<<"${GPU_CHECK_DRY_TOKENS:-2 1}" # fewer: a faster check (its test)
    dry=(--dry-run) compile_tokens=("${main_tokens[0]}") gpu=()
  fi
  rm -f "$OUT"/bench.md "$OUT"/divergence.csv "$OUT"/fdiv.csv "$OUT"/fused_linear.csv
  versions
  if [[ $MODE == bench ]]; then
    liger_wheels
    if built; then echo "fdistill is built"; else build; fi
  fi
  # Most wanted first: fused kernels vs eager and Liger, then fused-linear vs Liger, then the
  # torch.compile baselines (their compiles take the longest). A limit is a timeout; --budget-s,
  # below it, makes the benchmark skip cells instead of being killed mid-row.
  local limit
  limit=$(min 170 $(($(left) - 110)))
  step "divergence and f-divergence tables" "$limit" "$PY" -m benchmarks.bench_gpu "${dry[@]}" \
    --tokens "${main_tokens[@]}" --impls triton,triton_inplace,eager,liger,liger_kernel \
    --warmup-ms 20 --rep-ms 60 --budget-s $((limit - 20))
  limit=$(min 75 $(($(left) - 45)))
  step "fused-linear table" "$limit" "$PY" -m benchmarks.bench_fused_linear "${gpu[@]}" "${dry[@]}" \
    --tokens "${main_tokens[@]}" --append --rep-ms 60 --budget-s $((limit - 20))
  limit=$(($(left) - 5))
  step "torch.compile rows" "$limit" "$PY" -m benchmarks.bench_gpu "${dry[@]}" \
    --tokens "${compile_tokens[@]}" --impls compile --sections divergence --append \
    --warmup-ms 20 --rep-ms 60 --budget-s $((limit - 30))
}

main() {
  if [[ $MODE == tests ]]; then run_tests; else run_bench; fi
  echo
  echo "== summary ($MODE, $((SECONDS - START))s)"
  printf '  %s\n' "${SUMMARY[@]}"
  echo "files in $OUT:"
  ls -l "$OUT"
  return "$STATUS"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
