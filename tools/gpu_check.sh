#!/usr/bin/env bash
# The GPU check in one call: a bf16 MoE training run with all-to-all dispatch, MFU of ~1B dense and MoE models,
# the three-arm benchmark against plain PyTorch, then the GPU tests; each step under a timeout, the whole within
# GPU_CHECK_BUDGET_S seconds (default 450), results under OUT_DIR as each step finishes (see tools/gpu_check.py).
#
#   tools/gpu_check.sh [OUT_DIR]              # on a GPU machine; OUT_DIR defaults to $OUT when set, else runs/gpu_check
#   tools/gpu_check.sh --rehearse OUT_DIR     # the same steps on CPU at tiny sizes, in an environment made like the
#                                             # GPU machine's; ends with "rehearsal: N of N steps ok"
#
# The GPU machine has python3 with torch, numpy, pytest, tokenizers, tqdm, huggingface_hub and psutil, and no
# network: megatron-core comes from a wheel in .whl/ (pip download --no-deps megatron-core==0.16.1 for its Python
# and platform, see README "GPU"), installed with no index and no dependencies. megatron-moe runs from this
# checkout. Transformer Engine is used when importable. The rehearsal builds a fresh virtual environment with just
# those packages (no test plugins, no optional extras) and fetches the wheel for this Python into .whl/ if missing.
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=
if [ "${1:-}" = "--rehearse" ]; then REHEARSE=--rehearse; shift; fi
OUT_DIR=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/megatron-moe-gpu-check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT

if [ -n "$REHEARSE" ]; then
  python3 -m venv "$SCRATCH/venv" || exit 1
  PY=$SCRATCH/venv/bin/python
  "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0 numpy pytest tokenizers tqdm huggingface_hub psutil \
    >"$SCRATCH/pip.log" 2>&1 || { tail -5 "$SCRATCH/pip.log"; echo "rehearsal: could not build the environment"; exit 1; }
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d .whl megatron-core==0.16.1 \
    >"$SCRATCH/pip.log" 2>&1 || { tail -5 "$SCRATCH/pip.log"; echo "rehearsal: could not fetch megatron-core into .whl/"; exit 1; }
else
  PY=${PYTHON:-python3}
fi

if ! "$PY" -c "import megatron.core" 2>/dev/null; then
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --find-links .whl \
    --target "$SCRATCH/site" megatron-core==0.16.1 >"$SCRATCH/pip.log" 2>&1 \
    || { tail -5 "$SCRATCH/pip.log"; false; } \
    || { echo "megatron-core is not importable and .whl/ has no megatron-core 0.16.1 wheel for this Python" | tee "$OUT_DIR/summary.txt"; exit 1; }
  export PYTHONPATH=$SCRATCH/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" tools/gpu_check.py $REHEARSE "$OUT_DIR"
