#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv, torch 2.13.0 when no torch is
# installed, the test/benchmark tools, and fdistill built against that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# transformers/trl: fdistill[integrations] and its tests; pinning torch to the installed build keeps their
# dependency resolution from replacing it (e.g. the CPU wheel by a CUDA one)
python -m pip install -q numpy "triton>=3.2" ninja "pytest>=8" "pytest-benchmark>=4" expecttest ruff \
  "safetensors>=0.4" tqdm matplotlib "transformers>=5" "trl>=1.16" \
  "torch==$(python -c 'import torch; print(torch.__version__)')"
# --no-build-isolation: compile against the torch installed above, not a fresh (CUDA, multi-GB) one
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation --no-deps -e .
python -c "import fdistill; print('fdistill', fdistill.__version__, 'CPU kernels:', fdistill.cpu_capability())"
