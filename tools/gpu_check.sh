#!/usr/bin/env bash
# The GPU checks in one call: GPU tests, then the benchmarks, results under OUT_DIR.
#
#   tools/gpu_check.sh [OUT_DIR]          # default: $OUT when set (the device tool), else runs/gpu_check
#
# Needs torch with CUDA. megatron-core is installed from .whl/megatron_core-*.whl when it is not importable
# (machines without network: download it into .whl/ in this checkout first, see README "GPU"); Transformer
# Engine is used when importable (TE spec, FP8, grouped GEMM tests), otherwise those tests skip.
# Writes: gpu_check.log (nvidia-smi, test output, bench tables) and bench_<name>/bench.{json,md}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
LOG="$OUT_DIR/gpu_check.log"
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
  ls .whl/megatron_core-*.whl >/dev/null 2>&1 || { echo "megatron-core is not importable and .whl/ has no wheel" | tee "$LOG"; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/megatron-moe-site .whl/megatron_core-*.whl || exit 1
  export PYTHONPATH=/tmp/megatron-moe-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, megatron.core as m; print('torch', torch.__version__, '| megatron-core', m.__version__)"
  "$PY" -c "import transformer_engine as te; print('transformer-engine', te.__version__)" 2>/dev/null || echo "transformer-engine: not installed"
} 2>&1 | tee "$LOG"
status=0
"$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu.py 2>&1 | tee -a "$LOG" || status=1
for cfg in examples/tiny_three_arm/gpu.toml examples/bench/gpu_1b_dense.toml examples/bench/gpu_1b_moe.toml; do
  name=$(basename "$(dirname "$cfg")")_$(basename "$cfg" .toml)
  "$PY" -m megatron_moe.cli bench "$cfg" --steps 10 --warmup 3 --repeats 1 -o "$OUT_DIR/bench_$name" 2>&1 | tee -a "$LOG" || status=1
done
exit $status
