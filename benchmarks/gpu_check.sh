#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, torch with CUDA, triton, pytest, and no network:
#   1. builds fdistill there (the CUDA extension too when the tree has CUDA sources),
#   2. runs the GPU-marked tests (Triton vs the float64 reference on the GPU, large V),
#   3. runs the GPU benchmark, whose table is printed last.
# Wheels in .whl/ (e.g. liger-kernel for the baseline) are installed first, without network:
#   python3 -m pip download --no-deps --only-binary=:all: liger-kernel==0.8.5 -d .whl
# Usage: benchmarks/gpu_check.sh [bench_gpu options]; about 5 minutes on an H100/H200.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/fdistill_site "${wheels[@]}"
  export PYTHONPATH=/tmp/fdistill_site${PYTHONPATH:+:$PYTHONPATH}
fi

echo "== build"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())"
MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -q --no-build-isolation --no-deps -e .

echo "== GPU tests"
"$PY" -m pytest -q -m gpu tests/

echo "== GPU benchmark"
"$PY" -m benchmarks.bench_gpu "$@"

echo "== fused-linear GPU benchmark (issue 5: 8192 and 1024 tokens, H 4096, V 128256 bf16)"
"$PY" -m benchmarks.bench_fused_linear --device cuda --divergences jsd forward_kl
"$PY" -m benchmarks.bench_fused_linear --device cuda --tokens 1024 --divergences jsd
