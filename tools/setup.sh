#!/usr/bin/env bash
# Create .venv with megatron-moe and its test dependencies. torch comes first, pinned: PyPI's torch==2.13.0 is the
# CUDA build on Linux; set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU-only build. An
# environment that already has torch keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/python -c "import torch" 2>/dev/null \
  || .venv/bin/pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
.venv/bin/pip install -q -e '.[dev]'
