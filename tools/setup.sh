#!/usr/bin/env bash
# Create .venv with megatron-moe and its test dependencies. torch is installed first, pinned to the CPU
# build this project's CI uses (on a GPU machine, install into an environment that already has torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[dev]'
