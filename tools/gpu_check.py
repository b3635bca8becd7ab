"""The GPU check's steps, most valuable first, each in its own process under a timeout and a total time budget.

Run by tools/gpu_check.sh, which prepares the environment (see there). Each step's result is written to OUT_DIR as
soon as it finishes, so a call cut short keeps what finished:

  summary.txt           one line per step (ok, FAILED, TIMED OUT, not run), then the verdict
  gpu_check.log         every step's full output
  failures.txt          the last lines (the traceback) of each failed step
  train_metrics.jsonl   metrics.jsonl of the training step
  bench_<step>.json     bench.json of each benchmark step
  bench_tables.md       the benchmark tables

With --rehearse the same steps run in the same order on CPU at tiny sizes (fp32, eager baseline), so that install,
plugin, path, output and ordering defects show up before a GPU is lent.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TRAIN_LOSS_MARGIN = 1.5
"""The training step passes when its last train loss is at least this far below ln(vocabulary), the loss of a
uniform guess. Its config reached ln(512) - 2.61 on CPU in fp32 (30 steps); the margin leaves 1.1 nats for bf16 and
kernel differences on GPU."""

# Sizes for the CPU rehearsal: the GPU configs' shapes shrunk until every step takes seconds on 2 cores.
TINY_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
              "model.ffn_hidden_size=128", "model.seq_length=64", "train.micro_batch_size=2",
              "train.global_batch_size=2", "train.precision=auto"]
TINY_MOE = [*TINY_MODEL, "model.moe.expert_ffn_hidden_size=64"]


@dataclass
class Step:
    name: str
    args: list[str]
    timeout_s: int
    check: str = ""
    """What else to check once the command exits 0: "train" (the loss fell), "bench" (bench.json is sane)."""
    rehearse_args: list[str] = field(default_factory=list)


def steps(work: Path) -> list[Step]:
    cli = [sys.executable, "-m", "megatron_moe.cli"]
    bench = ["bench", "--steps", "10", "--warmup", "3", "--repeats", "1"]
    return [
        Step("environment", [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--environment"], 60),
        # bf16 on GPU (precision auto), the all-to-all token dispatcher: the path a cluster run takes.
        Step("train_moe_alltoall", [*cli, "train", "examples/tiny_moe.toml", "train.train_steps=30",
                                    "train.log_interval=5", "train.eval_interval=30", "train.lr=5e-3",
                                    "train.lr_warmup_steps=3", "model.moe.token_dispatcher=alltoall",
                                    f"train.output_dir={work / 'train'}"], 150, "train"),
        # MFU at ~1B parameters: the dense model, then the MoE with its active-matched dense.
        Step("mfu_1b_dense", [*cli, *bench, "examples/bench/gpu_1b_dense.toml", "--baseline", "none",
                              "-o", str(work / "mfu_1b_dense")], 120, "bench", TINY_MODEL),
        Step("mfu_1b_moe", [*cli, *bench, "examples/bench/gpu_1b_moe.toml", "--baseline", "none",
                            "-o", str(work / "mfu_1b_moe")], 150, "bench", TINY_MOE),
        # The three arms of the GPU study against plain PyTorch (torch.compile on GPU, eager on CPU).
        Step("three_arm", [*cli, *bench, "examples/tiny_three_arm/gpu.toml", "-o", str(work / "three_arm")],
             240, "bench", TINY_MOE),
        Step("gpu_tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs",
                           "tests/test_gpu.py"], 240),
    ]


def environment() -> None:
    """What the machine and the environment are: printed into the log by the first step."""
    import warnings

    warnings.simplefilter("ignore")  # megatron-core's import-time notes on missing apex / Transformer Engine
    import torch

    import megatron.core

    from megatron_moe.model import fusions, have_transformer_engine
    from megatron_moe.config import load_run_config
    from megatron_moe.parallel import backend_for
    from megatron_moe.train.monitors import device_peak_flops

    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"], check=False)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    name, peak = device_peak_flops(fp8=False)
    print(f"python {sys.version.split()[0]} | torch {torch.__version__} | megatron-core {megatron.core.__version__}"
          f" | transformer-engine {'yes' if have_transformer_engine() else 'no'}")
    print(f"device {name} | bf16 peak {'unknown' if peak is None else f'{peak / 1e12:,.0f} TFLOP/s'}"
          f" | backend {backend_for(device)}")
    model = load_run_config(str(REPO / "examples" / "tiny_moe.toml")).model
    on = [k for k, v in fusions(model, on_gpu, have_transformer_engine()).items() if v]
    print(f"fused kernels on: {', '.join(on) or 'none'}")


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def check_train(work: Path, out: Path) -> str:
    rows = [json.loads(line) for line in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    shutil.copyfile(work / "train" / "metrics.jsonl", out / "train_metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    vocab = 512  # examples/tiny_moe.toml's
    last = train[-1]["loss"]
    limit = math.log(vocab) - TRAIN_LOSS_MARGIN
    detail = (f"loss {train[0]['loss']:.3f} -> {last:.3f} (pass: <= {limit:.3f}), "
              f"{train[-1]['tokens_per_s']:,.0f} tok/s")
    if "gpu_mem_allocated_peak_gib" in train[-1]:  # against the planner's estimate of the same run
        from megatron_moe.config import load_run_config
        from megatron_moe.planner.memory import estimate_memory

        cfg = load_run_config(work / "train" / "config.toml")
        estimate = estimate_memory(cfg, 1, precision=cfg.train.resolved_precision(on_gpu=True)).per_gpu.total / 2**30
        peak = train[-1]["gpu_mem_allocated_peak_gib"]
        detail += f", peak GPU mem {peak:.2f} GiB allocated, planner estimate {estimate:.2f} GiB ({peak / estimate:.2f}x)"
    if not last <= limit:
        raise AssertionError(f"the loss did not fall enough: {detail}")
    return detail


def check_bench(step: str, work: Path, out: Path) -> str:
    result = json.loads((work / step / "bench.json").read_text())
    shutil.copyfile(work / step / "bench.json", out / f"bench_{step}.json")
    with (out / "bench_tables.md").open("a") as f:
        f.write(f"### {step}\n\n" + (work / step / "bench.md").read_text() + "\n")
    parts = []
    for case in result["cases"]:
        ours = case["megatron"]
        if not ours["tokens_per_s"] > 0:
            raise AssertionError(f"{case['name']}: {ours['tokens_per_s']} tokens/s")
        if ours["mfu"] is not None and not 0 < ours["mfu"] < 1:
            raise AssertionError(f"{case['name']}: MFU {ours['mfu']} outside (0, 1)")
        mfu = "" if ours["mfu"] is None else f", MFU {ours['mfu']:.1%}"
        parts.append(f"{case['name']} {ours['tokens_per_s']:,.0f} tok/s{mfu}")
    return "; ".join(parts)


def main(out: Path, rehearse: bool, budget_s: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("summary.txt", "gpu_check.log", "failures.txt", "bench_tables.md"):
        (out / name).unlink(missing_ok=True)
    deadline = time.monotonic() + budget_s
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    summary, log, failures = out / "summary.txt", out / "gpu_check.log", out / "failures.txt"

    def note(line: str) -> None:
        print(line, flush=True)
        with summary.open("a") as f:
            f.write(line + "\n")

    ok = 0
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="megatron-moe-gpu-check-") as tmp:
        work = Path(tmp)
        plan = steps(work)
        for step in plan:
            left = deadline - time.monotonic()
            if left < 10:
                note(f"{step.name}: not run, the time budget ({budget_s:.0f} s) is spent")
                failed.append(step.name)
                continue
            args = step.args + (step.rehearse_args if rehearse else [])
            timeout = min(step.timeout_s, left)
            began = time.monotonic()
            try:
                proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
                output, rc = proc.stdout + proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as exc:
                output = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr))
                rc = None
            took = time.monotonic() - began
            with log.open("a") as f:
                f.write(f"===== {step.name}: {' '.join(args)}\n{output}\n")
            try:
                if rc is None:
                    raise AssertionError(f"timed out after {timeout:.0f} s")
                if rc != 0:
                    raise AssertionError(f"exit {rc}: {_tail(output, 1)}")
                if step.check == "train":
                    detail = check_train(work, out)
                elif step.check == "bench":
                    detail = check_bench(step.name, work, out)
                else:
                    detail = _tail(proc.stdout, 1)
            except Exception as exc:  # noqa: BLE001 - any failure of a step is reported and the next one runs
                note(f"{step.name}: FAILED in {took:.0f} s: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                with failures.open("a") as f:
                    f.write(f"===== {step.name}\n{_tail(output)}\n{type(exc).__name__}: {exc}\n\n")
                failed.append(step.name)
                continue
            note(f"{step.name}: ok in {took:.0f} s: {detail}")
            ok += 1
    what = "rehearsal" if rehearse else "gpu check"
    verdict = f"{what}: {ok} of {len(plan)} steps ok" + (f"; failed: {', '.join(failed)}" if failed else "")
    note(verdict)
    if (out / "bench_tables.md").exists():
        print("\n" + (out / "bench_tables.md").read_text())
    return 0 if not failed else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--environment"]:
        environment()
        sys.exit(0)
    rehearse = "--rehearse" in sys.argv[1:]
    rest = [a for a in sys.argv[1:] if a != "--rehearse"]
    if len(rest) != 1:
        sys.exit("usage: tools/gpu_check.py [--rehearse] OUT_DIR (use tools/gpu_check.sh)")
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", "450"))
    sys.exit(main(Path(rest[0]), rehearse, budget))
