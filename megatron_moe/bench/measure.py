"""Training throughput: our megatron-core trainer against the same model in plain PyTorch.

`megatron-moe bench CONFIG` measures, for a run config (an MoE config also gets its active-parameter-
matched dense model) or for every arm of a study config:

- tokens/s, TFLOP/s per device (planner FLOPs per training token) and MFU against the device's peak
  (the peak used is printed; unknown devices, and CPUs, get no MFU);
- the same model in plain PyTorch (`bench.baseline`), eager or `torch.compile`d, with the same shapes,
  batch, optimizer and precision (bf16 autocast on GPU), measured in the same run;
- for each MoE arm, its step time over the active-matched dense arm's step time.

Both sides time the same work: forward, backward and optimizer step over batches already on the device, back
to back between one synchronisation before and one after (no per-step host sync of the harness on the measured
path), with the Adam implementation megatron-core uses. `sides` in bench.json says what each runs. Every
measurement runs in a fresh single-device process (parallel sizes are set to 1), alternating the paths `repeats`
times; warm-up steps are excluded and the median over repeats of the mean step time is reported, with peak GPU
memory (allocated and reserved) on GPU. Results are written as bench.json and bench.md (a Markdown table naming the
device) to --out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform as pyplatform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from megatron_moe.data.source import with_data_vocabulary
from megatron_moe.bench.baseline import megatron_uses_fused_adam, plain_description, run_plain, time_steps
from megatron_moe.config import ConfigError, RunConfig, load_run_config
from megatron_moe.schema import load_toml, save_toml
from megatron_moe.files import atomic_write_json, atomic_write_text
from megatron_moe.text import human
from megatron_moe.planner.ledger import ledger
from megatron_moe.planner.match import match_dense


BASELINES = ("auto", "eager", "compile", "none")


@dataclasses.dataclass
class Case:
    """One model to measure."""

    name: str
    config: RunConfig
    reference: str | None = None
    """For an MoE case, the name of its active-matched dense case (for the step-time ratio)."""


# ---------------------------------------------------------------- what to measure


def bench_config(cfg: RunConfig, steps: int, warmup: int) -> RunConfig:
    """The run config a measurement trains: one device, no logging, metric sinks, evaluation or checkpoints."""
    cfg = dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(cfg.parallel, tensor=1, pipeline=1, expert=1, sequence_parallel=False),
        train=dataclasses.replace(
            cfg.train,
            train_steps=steps + warmup,
            lr_warmup_steps=0,
            log_interval=10**9,
            eval_interval=0,
            save_interval=0,
            tensorboard_dir="",
            wandb_project="",
            micro_batch_size=min(cfg.train.micro_batch_size, cfg.train.global_batch_size),
        ),
    )
    if cfg.train.global_batch_size % cfg.train.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size = {cfg.train.global_batch_size} must be a multiple of "
            f"train.micro_batch_size = {cfg.train.micro_batch_size} on one device"
        )
    return cfg


def cases_for(path: str | None, overrides: list[str]) -> tuple[list[Case], str]:
    """The cases of a run config (plus its active-matched dense when MoE) or of a study's arms."""
    if path and "study" in load_toml(path):
        from megatron_moe.study.design import derive_arms
        from megatron_moe.study.spec import load_study

        study = load_study(path, overrides, check_world=False)  # measured on one device
        arms, _, _ = derive_arms(study, check_world=False)
        dense_active = next((a.name for a in arms if not a.config.model.is_moe and a.contract == "active"), None)
        return [Case(a.name, a.config, dense_active if a.config.model.is_moe else None) for a in arms], study.study.name
    cfg = with_data_vocabulary(load_run_config(path, overrides, world_size=None))
    name = Path(path).stem if path else "default"
    if not cfg.model.is_moe:
        return [Case("dense", cfg)], name
    dense = dataclasses.replace(cfg, model=match_dense(cfg.model, "active", cfg.parallel.tensor).config)
    return [Case("moe", cfg, "dense_active"), Case("dense_active", dense)], name


def run_megatron(cfg: RunConfig, steps: int, warmup: int) -> float:
    """Mean step time of `Trainer.bare_step`: the forward, backward and optimizer work of `megatron-moe train`'s step,
    on batches already on the device, without the loop's bookkeeping (loss readback, MoE loss readout)."""
    from megatron_moe.train.trainer import Trainer

    trainer = Trainer(cfg, quiet=True)
    batches = [trainer.micro_batches(trainer.data.train_batch(i)) for i in range(steps + warmup)]
    return time_steps(trainer.bare_step, batches, warmup)


def megatron_description(on_gpu: bool) -> str:
    """What the megatron-core side runs, in words, for the bench output."""
    adam = "fused Adam" if megatron_uses_fused_adam() and on_gpu else "torch AdamW"
    weights = "bf16 weights with fp32 main weights and gradient buffer" if on_gpu else "fp32"
    return (f"megatron-core GPTModel, DDP and optimizer as `train` builds them: {weights}, {adam}, global-norm "
            "clipping (a host sync inside megatron-core's optimizer step)")


def worker(kind: str, config: str, out: str, steps: int, warmup: int) -> None:
    """One measurement in this process; writes the mean step time (seconds) and peak GPU memory as JSON to `out`."""
    from megatron_moe.train.monitors import gpu_memory

    cfg = load_run_config(config)
    if kind == "megatron":
        step_s = run_megatron(cfg, steps, warmup)
    else:
        step_s = run_plain(cfg, steps, warmup, compile_model=kind == "compile")
    atomic_write_json(out, {"step_s": step_s, **gpu_memory()})


# ---------------------------------------------------------------- orchestration


def device_description() -> tuple[str, str]:
    """(device name, short label) of the device measurements run on."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return name, name
    model = pyplatform.processor() or pyplatform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads", "CPU"


def _measure(kind: str, cfg_path: Path, steps: int, warmup: int, tmp: Path) -> dict[str, float]:
    out = tmp / f"{kind}-{time.monotonic_ns()}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_moe.bench.measure", "--worker", kind, str(cfg_path), str(out), str(steps), str(warmup)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{kind} measurement of {cfg_path.stem} failed: {tail[0]}")
    return json.loads(out.read_text())


def bench(
    path: str | None,
    overrides: list[str],
    *,
    steps: int = 10,
    warmup: int = 3,
    repeats: int = 2,
    baseline: str = "auto",
    out_dir: str | None = None,
    echo=print,
) -> dict[str, Any]:
    """Measure every case; returns (and writes to `out_dir`) the results."""
    import torch

    from megatron_moe.study.studydir import environment
    from megatron_moe.train.monitors import device_peak_flops
    from megatron_moe.train.trainer import resolve_precision

    if baseline not in BASELINES:
        raise ConfigError(f"--baseline {baseline!r} is not one of {', '.join(BASELINES)}")
    for flag, value, low in (("--steps", steps, 1), ("--warmup", warmup, 0), ("--repeats", repeats, 1)):
        if value < low:
            raise ConfigError(f"{flag} {value} must be >= {low}")
    on_gpu = torch.cuda.is_available()
    if baseline == "auto":
        baseline = "compile" if on_gpu else "eager"
    cases, name = cases_for(path, overrides)
    if baseline != "none" and any(c.config.model.moe.capacity_factor for c in cases):
        raise ConfigError("model.moe.capacity_factor > 0: the plain-PyTorch baseline is dropless; "
                          "set it to 0 or use --baseline none")
    layouts = {(c.config.parallel.tensor, c.config.parallel.pipeline, c.config.parallel.expert) for c in cases}
    if layouts != {(1, 1, 1)}:
        t, p, e = sorted(layouts)[-1]
        echo(f"note: bench measures one device; the config's layout (tensor {t}, pipeline {p}, expert {e}) is set to 1")
    cases = [dataclasses.replace(c, config=bench_config(c.config, steps, warmup)) for c in cases]
    params_dtype, fp8 = resolve_precision(cases[0].config.train.precision, on_gpu)
    device, label = device_description()
    _, peak = device_peak_flops(fp8)
    precision = "fp8" if fp8 else ("bf16" if params_dtype == torch.bfloat16 else "fp32")
    kinds = ["megatron"] + ([] if baseline == "none" else [baseline])
    total = len(cases) * len(kinds) * repeats
    echo(f"benchmark {name!r} on {device}: {len(cases)} model(s) x {len(kinds)} path(s) x {repeats} repeat(s), "
         f"{steps} timed steps after {warmup} warm-up steps each, {precision}")
    done = 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="megatron-moe-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for case in cases:
            cfg_path = tmp / f"{case.name}.toml"
            case.config.train.output_dir = str(tmp / f"run-{case.name}")
            save_toml(case.config, cfg_path)
            times: dict[str, list[float]] = {k: [] for k in kinds}
            memory: dict[str, dict[str, float]] = {k: {} for k in kinds}
            for _ in range(repeats):
                for kind in kinds:
                    measured = _measure(kind, cfg_path, steps, warmup, tmp)
                    times[kind].append(measured.pop("step_s"))
                    for key, value in measured.items():  # peak GPU memory: the largest of the repeats
                        memory[kind][key] = max(value, memory[kind].get(key, 0.0))
                    done += 1
                    tok = case.config.train.global_batch_size * case.config.model.seq_length / times[kind][-1]
                    echo(f"  [{done}/{total}] {case.name} {_path_label(kind)}: {tok:,.0f} tok/s")
            led = ledger(case.config.model, 1)
            row: dict[str, Any] = {
                "name": case.name,
                "is_moe": case.config.model.is_moe,
                "total_params": led.total_params,
                "active_params": led.active_params,
                "flops_train_per_token": led.flops_train_per_token,
                "tokens_per_step": case.config.train.global_batch_size * case.config.model.seq_length,
                "reference": case.reference,
            }
            for kind in kinds:
                step_s = statistics.median(times[kind])
                tokens_per_s = row["tokens_per_step"] / step_s
                tflops = tokens_per_s * led.flops_train_per_token / 1e12
                row[kind] = {
                    "step_s": step_s,
                    "step_s_each_repeat": times[kind],
                    "tokens_per_s": tokens_per_s,
                    "tflops_per_device": tflops,
                    "mfu": tflops * 1e12 / peak if peak else None,
                    **memory[kind],
                }
            if baseline != "none":
                row["megatron_over_baseline"] = row["megatron"]["tokens_per_s"] / row[baseline]["tokens_per_s"]
            rows.append(row)
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        ref = by_name.get(row["reference"] or "")
        if ref is not None:
            row["step_over_reference_step"] = row["megatron"]["step_s"] / ref["megatron"]["step_s"]
    result = {
        "name": name,
        "config": path,
        "overrides": list(overrides),
        "device": device,
        "device_label": label,
        "precision": precision,
        "peak_flops": peak,
        "peak_source": _peak_source(peak, fp8),
        "baseline": baseline,
        "sides": {kind: megatron_description(on_gpu) if kind == "megatron"
                  else plain_description(kind == "compile", on_gpu) for kind in kinds},
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "versions": environment(),
        "cases": rows,
    }
    table = markdown(result)
    echo("")
    echo(table)
    if out_dir:
        out = Path(out_dir)
        atomic_write_json(out / "bench.json", result)
        atomic_write_text(out / "bench.md", table + "\n")
        echo(f"\nwrote {out / 'bench.json'} and {out / 'bench.md'}")
    return result


def _peak_source(peak: float | None, fp8: bool) -> str:
    if peak is None:
        return "no known peak for this device: MFU not reported"
    kind = "FP8 (2x the bf16 figure)" if fp8 else "bf16"
    return f"datasheet dense {kind} tensor-core peak, {peak / 1e12:,.0f} TFLOP/s"


def _path_label(kind: str) -> str:
    return {"megatron": "megatron-core", "eager": "plain PyTorch", "compile": "plain PyTorch + torch.compile"}[kind]


def markdown(result: dict[str, Any]) -> str:
    """The results as a Markdown table naming the device, the peak and the baseline."""
    base = result["baseline"]
    head = ["model", "params (total / active)", "megatron-core tok/s", "TFLOP/s", "MFU"]
    if base != "none":
        plain_precision = " (bf16)" if result["precision"] == "fp8" else ""
        head += [f"{_path_label(base)}{plain_precision} tok/s", "ours / plain"]
    head += ["step / active-matched dense step"]
    with_memory = any("gpu_mem_allocated_peak_gib" in r["megatron"] for r in result["cases"])
    if with_memory:
        head += ["megatron-core peak GPU mem, allocated / reserved (GiB)"]
    lines = [
        f"**{result['name']}** on {result['device']} ({result['precision']}; torch {result['versions']['torch']}, "
        f"megatron-core {result['versions']['megatron-core']}). Peak for MFU: {result['peak_source']}. "
        f"Median of {result['repeats']} fresh-process measurement(s) of the mean over {result['steps']} steps.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for r in result["cases"]:
        ours = r["megatron"]
        cells = [
            r["name"],
            f"{human(r['total_params'])} / {human(r['active_params'])}",
            f"{ours['tokens_per_s']:,.0f}",
            f"{ours['tflops_per_device']:.3g}",
            "n/a" if ours["mfu"] is None else f"{ours['mfu']:.1%}",
        ]
        if base != "none":
            cells += [f"{r[base]['tokens_per_s']:,.0f}", f"{r['megatron_over_baseline']:.3f}"]
        ratio = r.get("step_over_reference_step")
        cells.append("" if ratio is None else f"{ratio:.3f} (vs {r['reference']})")
        if with_memory:
            cells.append(f"{ours['gpu_mem_allocated_peak_gib']:.1f} / {ours['gpu_mem_reserved_peak_gib']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    kinds = ["megatron"] + ([] if base == "none" else [base])
    lines += ["", *(f"- {_path_label(kind)}: {result['sides'][kind]}" for kind in kinds)]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--worker":
        kind, config, out, steps, warmup = sys.argv[2:]
        worker(kind, config, out, int(steps), int(warmup))
    else:
        sys.exit("usage: python -m megatron_moe.bench.measure --worker KIND CONFIG OUT STEPS WARMUP "
                 "(use `megatron-moe bench`)")
