"""Training throughput: our megatron-core trainer against the same model in plain PyTorch.

`megatron-moe bench CONFIG` measures, for a run config (an MoE config also gets its active-parameter-
matched dense model) or for every arm of a study config:

- tokens/s, TFLOP/s per device (planner FLOPs per training token) and MFU against the device's peak
  (the peak used is printed; unknown devices, and CPUs, get no MFU);
- the same model written in plain PyTorch here (`PlainGPT`: embedding, pre-norm blocks with fused-QKV
  GQA attention through `scaled_dot_product_attention` and RoPE, SwiGLU/GELU MLP or a top-k MoE with the
  same aux losses, AdamW, clipping), eager or `torch.compile`d, with the same shapes, batch, optimizer
  and precision (bf16 autocast on GPU), measured in the same run;
- for each MoE arm, its step time over the active-matched dense arm's step time.

Every measurement runs in a fresh single-device process (parallel sizes are set to 1), alternating
the paths `repeats` times; warm-up steps are excluded and the median step time is reported. Results
are written as bench.json and bench.md (a Markdown table naming the device) to --out.
"""

from __future__ import annotations

import contextlib
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

from megatron_moe.config import ConfigError, RunConfig, load_run_config, load_toml, save_toml
from megatron_moe.planner import ledger, match_dense, padded_vocab_size
from megatron_moe.utils import atomic_write_json, atomic_write_text

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
    """The run config a measurement trains: one device, no logging, evaluation or checkpoints."""
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
        from megatron_moe.study import derive_arms, load_study

        study = load_study(path, overrides, check_world=False)  # measured on one device
        arms, _, _ = derive_arms(study, check_world=False)
        dense_active = next((a.name for a in arms if not a.config.model.is_moe and a.contract == "active"), None)
        return [Case(a.name, a.config, dense_active if a.config.model.is_moe else None) for a in arms], study.study.name
    cfg = load_run_config(path, overrides, world_size=None)
    name = Path(path).stem if path else "default"
    if not cfg.model.is_moe:
        return [Case("dense", cfg)], name
    dense = dataclasses.replace(cfg, model=match_dense(cfg.model, "active", cfg.parallel.tensor).config)
    return [Case("moe", cfg, "dense_active"), Case("dense_active", dense)], name


# ---------------------------------------------------------------- the plain-PyTorch baseline


def plain_model(m):
    """The model of ModelConfig `m` written directly in PyTorch (no megatron-core)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    hd = m.hidden_size // m.num_attention_heads
    vocab = padded_vocab_size(m, 1)  # the vocabulary megatron-core builds on one device
    norm = nn.RMSNorm if m.normalization == "RMSNorm" else nn.LayerNorm
    e = m.moe

    def rope(x, cos, sin):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class MLP(nn.Module):
        def __init__(self, ffn):
            super().__init__()
            gated = m.activation == "swiglu"
            self.fc1 = nn.Linear(m.hidden_size, (2 if gated else 1) * ffn, bias=False)
            self.fc2 = nn.Linear(ffn, m.hidden_size, bias=False)

        def forward(self, x):
            h = self.fc1(x)
            if m.activation == "swiglu":
                a, b = h.chunk(2, dim=-1)
                return self.fc2(F.silu(a) * b)
            return self.fc2(F.gelu(h))

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(m.hidden_size, e.num_experts, bias=False)
            self.experts = nn.ModuleList(MLP(m.expert_ffn) for _ in range(e.num_experts))
            self.shared = MLP(e.shared_expert_ffn_hidden_size) if e.shared_expert_ffn_hidden_size else None
            self.aux = torch.zeros(())

        def forward(self, x):
            flat = x.reshape(-1, x.shape[-1])
            logits = self.router(flat).float()
            scores = logits.softmax(-1) if e.score_function == "softmax" else logits.sigmoid()
            if e.topk_renormalize and e.score_function == "softmax":
                top, chosen = logits.topk(e.top_k, dim=-1)
                weights = top.softmax(-1)
            else:
                weights, chosen = scores.topk(e.top_k, dim=-1)
                if e.topk_renormalize:
                    weights = weights / weights.sum(-1, keepdim=True)
            load = F.one_hot(chosen, e.num_experts).sum(dim=(0, 1)).float() / chosen.numel()
            self.aux = e.num_experts * (load * scores.mean(0)).sum() * e.aux_loss_coeff
            self.aux = self.aux + e.z_loss_coeff * torch.logsumexp(logits, -1).pow(2).mean()
            weights = weights.to(x.dtype)
            out = torch.zeros_like(flat)
            for i, expert in enumerate(self.experts):
                rows, slot = (chosen == i).nonzero(as_tuple=True)
                if rows.numel():
                    out.index_add_(0, rows, (expert(flat[rows]) * weights[rows, slot, None]).to(out.dtype))
            if self.shared is not None:
                out = out + self.shared(flat)
            return out.view_as(x)

    class Block(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.norm1, self.norm2 = norm(m.hidden_size, eps=m.norm_epsilon), norm(m.hidden_size, eps=m.norm_epsilon)
            self.qkv = nn.Linear(m.hidden_size, (m.num_attention_heads + 2 * m.kv_heads) * hd, bias=False)
            self.proj = nn.Linear(m.hidden_size, m.hidden_size, bias=False)
            self.mlp = MoE() if e.is_moe_layer(layer) else MLP(m.ffn_hidden_size)

        def forward(self, x, cos, sin):
            b, s, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).split([m.num_attention_heads * hd, m.kv_heads * hd, m.kv_heads * hd], -1)
            q, k, v = (t.view(b, s, -1, hd).transpose(1, 2) for t in (q, k, v))
            if cos is not None:
                q, k = rope(q, cos, sin), rope(k, cos, sin)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=m.kv_heads != m.num_attention_heads)
            x = x + self.proj(att.transpose(1, 2).reshape(b, s, -1))
            return x + self.mlp(self.norm2(x))

    class PlainGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, m.hidden_size)
            self.pos = nn.Embedding(m.seq_length, m.hidden_size) if m.position_embedding == "learned_absolute" else None
            self.blocks = nn.ModuleList(Block(i) for i in range(m.num_layers))
            self.norm = norm(m.hidden_size, eps=m.norm_epsilon)
            self.out = nn.Linear(m.hidden_size, vocab, bias=False)
            if m.tie_embeddings:
                self.out.weight = self.emb.weight
            inv = 1.0 / (m.rotary_base ** (torch.arange(0, hd, 2).float() / hd))
            freqs = torch.outer(torch.arange(m.seq_length).float(), inv)
            self.register_buffer("cos", freqs.cos(), persistent=False)
            self.register_buffer("sin", freqs.sin(), persistent=False)
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = m.init_method_std / ((2 * m.num_layers) ** 0.5 if name.endswith(("proj.weight", "fc2.weight")) else 1)
                    nn.init.normal_(p, 0.0, std)

        def forward(self, tokens, labels):
            x = self.emb(tokens)
            if self.pos is not None:
                x = x + self.pos.weight[: tokens.shape[1]]
            rot = (self.cos, self.sin) if self.pos is None else (None, None)
            for block in self.blocks:
                x = block(x, *rot)
            logits = self.out(self.norm(x))
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.reshape(-1))
            aux = sum(b.mlp.aux for b in self.blocks if isinstance(b.mlp, MoE))
            return loss, loss + aux

    return PlainGPT()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_plain(cfg: RunConfig, steps: int, warmup: int, compile_model: bool) -> list[float]:
    """Step times of the plain-PyTorch model (AdamW, clipping, micro-batch accumulation as configured)."""
    import torch

    from megatron_moe.data import build_data_source
    from megatron_moe.training import resolve_precision

    t = cfg.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(t.seed)
    model = plain_model(cfg.model).to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
        weight_decay=t.weight_decay, fused=device.type == "cuda",
    )
    step_fn = torch.compile(model) if compile_model else model
    # Mixed precision where our path trains in bf16 or FP8 (the baseline has no FP8: bf16 there).
    params_dtype, _ = resolve_precision(t.precision, device.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if params_dtype != torch.float32 else None
    data = build_data_source(cfg.data, cfg.model.seq_length, t.global_batch_size, t.train_steps)
    micro = t.global_batch_size // t.micro_batch_size
    times = []
    for step in range(steps + warmup):
        batch = torch.from_numpy(data.train_batch(step)).to(device, non_blocking=True)
        _sync()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for chunk in batch.chunk(micro):
            with amp or contextlib.nullcontext():
                _, total = step_fn(chunk[:, :-1], chunk[:, 1:])
            (total / micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        opt.step()
        _sync()
        times.append(time.perf_counter() - start)
    return times[warmup:]


def run_megatron(cfg: RunConfig, steps: int, warmup: int) -> list[float]:
    """Step times of `megatron_moe.training.Trainer.train_step` (the path `megatron-moe train` uses)."""
    from megatron_moe.training import Trainer

    trainer = Trainer(cfg, quiet=True)
    times = []
    for _ in range(steps + warmup):
        _sync()
        start = time.perf_counter()
        trainer.train_step()
        _sync()
        times.append(time.perf_counter() - start)
    return times[warmup:]


def worker(kind: str, config: str, out: str, steps: int, warmup: int) -> None:
    """One measurement in this process; writes the step times (seconds) as JSON to `out`."""
    cfg = load_run_config(config)
    if kind == "megatron":
        times = run_megatron(cfg, steps, warmup)
    else:
        times = run_plain(cfg, steps, warmup, compile_model=kind == "compile")
    atomic_write_json(out, {"step_s": times})


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


def _measure(kind: str, cfg_path: Path, steps: int, warmup: int, tmp: Path) -> float:
    out = tmp / f"{kind}-{time.monotonic_ns()}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_moe.bench", "--worker", kind, str(cfg_path), str(out), str(steps), str(warmup)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{kind} measurement of {cfg_path.stem} failed: {tail[0]}")
    return statistics.median(json.loads(out.read_text())["step_s"])


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

    from megatron_moe.study import environment
    from megatron_moe.training import device_peak_flops, resolve_precision

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
            for _ in range(repeats):
                for kind in kinds:
                    times[kind].append(_measure(kind, cfg_path, steps, warmup, tmp))
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


def _fmt_params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def markdown(result: dict[str, Any]) -> str:
    """The results as a Markdown table naming the device, the peak and the baseline."""
    base = result["baseline"]
    head = ["model", "params (total / active)", "megatron-core tok/s", "TFLOP/s", "MFU"]
    if base != "none":
        plain_precision = " (bf16)" if result["precision"] == "fp8" else ""
        head += [f"{_path_label(base)}{plain_precision} tok/s", "ours / plain"]
    head += ["step / active-matched dense step"]
    lines = [
        f"**{result['name']}** on {result['device']} ({result['precision']}; torch {result['versions']['torch']}, "
        f"megatron-core {result['versions']['megatron-core']}). Peak for MFU: {result['peak_source']}. "
        f"Median of {result['repeats']} fresh-process measurement(s) x {result['steps']} steps.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for r in result["cases"]:
        ours = r["megatron"]
        cells = [
            r["name"],
            f"{_fmt_params(r['total_params'])} / {_fmt_params(r['active_params'])}",
            f"{ours['tokens_per_s']:,.0f}",
            f"{ours['tflops_per_device']:.3g}",
            "n/a" if ours["mfu"] is None else f"{ours['mfu']:.1%}",
        ]
        if base != "none":
            cells += [f"{r[base]['tokens_per_s']:,.0f}", f"{r['megatron_over_baseline']:.3f}"]
        ratio = r.get("step_over_reference_step")
        cells.append("" if ratio is None else f"{ratio:.3f} (vs {r['reference']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--worker":
        kind, config, out, steps, warmup = sys.argv[2:]
        worker(kind, config, out, int(steps), int(warmup))
    else:
        sys.exit("usage: python -m megatron_moe.bench --worker KIND CONFIG OUT STEPS WARMUP (use `megatron-moe bench`)")
