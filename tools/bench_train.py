"""Training throughput: our megatron-core path against a plain-PyTorch model of the same shapes.

    python tools/bench_train.py                       # tiny dense + tiny MoE (4 experts top-2), CPU
    python tools/bench_train.py --steps 30 --layers 4 --hidden 256 --json out.json

For each model it runs, one after another in fresh processes on this machine: the megatron-core trainer
(`megatron_moe.training.Trainer`, the path `megatron-moe train` uses) and a plain-PyTorch GPT written here
(RMSNorm, GQA attention with RoPE through `scaled_dot_product_attention`, SwiGLU MLP or a top-k MoE,
AdamW, gradient clipping) with the same shapes, batch and optimizer. It prints tokens/s for each, their
ratio, and the MoE step time over the active-parameter-matched dense step time (dense width from the
planner). Warm-up steps are excluded; the median of the timed steps is used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def model_overrides(args, moe: bool) -> list[str]:
    o = [
        f"model.vocab_size={args.vocab}", f"model.seq_length={args.seq}", f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}", f"model.num_attention_heads={args.heads}",
        f"model.num_query_groups={args.groups}", f"model.ffn_hidden_size={args.ffn}",
        f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}",
        f"train.train_steps={args.steps + args.warmup}", "train.lr_warmup_steps=0", "train.log_interval=1000000",
        "model.moe.z_loss_coeff=0.001", "model.moe.aux_loss_coeff=0.01",
    ]
    if moe:
        o += [f"model.moe.num_experts={args.experts}", f"model.moe.top_k={args.top_k}", f"model.moe.expert_ffn_hidden_size={args.ffn}"]
    return o


# ---------------------------------------------------------------- plain PyTorch baseline


def plain_model(cfg):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    m = cfg.model
    hd = m.hidden_size // m.num_attention_heads

    def rope(x, cos, sin):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class SwiGLU(nn.Module):
        def __init__(self, ffn):
            super().__init__()
            self.fc1 = nn.Linear(m.hidden_size, 2 * ffn, bias=False)
            self.fc2 = nn.Linear(ffn, m.hidden_size, bias=False)

        def forward(self, x):
            a, b = self.fc1(x).chunk(2, dim=-1)
            return self.fc2(F.silu(a) * b)

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(m.hidden_size, m.moe.num_experts, bias=False)
            self.experts = nn.ModuleList(SwiGLU(m.expert_ffn) for _ in range(m.moe.num_experts))

        def forward(self, x):
            flat = x.reshape(-1, x.shape[-1])
            logits = self.router(flat).float()
            weights, chosen = logits.topk(m.moe.top_k, dim=-1)
            weights = weights.softmax(dim=-1).to(x.dtype)
            probs = logits.softmax(dim=-1)
            load = F.one_hot(chosen, m.moe.num_experts).sum(dim=(0, 1)).float() / chosen.numel()
            self.aux = m.moe.num_experts * (load * probs.mean(0)).sum() * m.moe.aux_loss_coeff
            self.aux = self.aux + m.moe.z_loss_coeff * torch.logsumexp(logits, -1).pow(2).mean()
            out = torch.zeros_like(flat)
            for e, expert in enumerate(self.experts):
                rows, slot = (chosen == e).nonzero(as_tuple=True)
                if rows.numel():
                    out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None])
            return out.view_as(x)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.RMSNorm(m.hidden_size), nn.RMSNorm(m.hidden_size)
            self.qkv = nn.Linear(m.hidden_size, (m.num_attention_heads + 2 * m.kv_heads) * hd, bias=False)
            self.proj = nn.Linear(m.hidden_size, m.hidden_size, bias=False)
            self.mlp = MoE() if m.is_moe else SwiGLU(m.ffn_hidden_size)

        def forward(self, x, cos, sin):
            b, s, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).split([m.num_attention_heads * hd, m.kv_heads * hd, m.kv_heads * hd], -1)
            q = rope(q.view(b, s, -1, hd).transpose(1, 2), cos, sin)
            k = rope(k.view(b, s, -1, hd).transpose(1, 2), cos, sin)
            v = v.view(b, s, -1, hd).transpose(1, 2)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.proj(att.transpose(1, 2).reshape(b, s, -1))
            return x + self.mlp(self.norm2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(m.vocab_size, m.hidden_size)
            self.blocks = nn.ModuleList(Block() for _ in range(m.num_layers))
            self.norm = nn.RMSNorm(m.hidden_size)
            self.out = nn.Linear(m.hidden_size, m.vocab_size, bias=False)
            inv = 1.0 / (m.rotary_base ** (torch.arange(0, hd, 2).float() / hd))
            freqs = torch.outer(torch.arange(m.seq_length).float(), inv)
            self.register_buffer("cos", torch.cat([freqs.cos()] * 1, -1), persistent=False)
            self.register_buffer("sin", torch.cat([freqs.sin()] * 1, -1), persistent=False)

        def forward(self, tokens, labels):
            x = self.emb(tokens)
            for block in self.blocks:
                x = block(x, self.cos, self.sin)
            logits = self.out(self.norm(x))
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.reshape(-1))
            aux = sum(getattr(b.mlp, "aux", 0.0) for b in self.blocks)
            return loss, loss + aux

    return GPT()


def run_plain(cfg, steps: int, warmup: int) -> list[float]:
    import torch

    from megatron_moe.data import build_data_source

    torch.manual_seed(0)
    model = plain_model(cfg)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    data = build_data_source(cfg.data, cfg.model.seq_length, t.global_batch_size)
    times = []
    for step in range(steps + warmup):
        batch = torch.from_numpy(data.train_batch(step))
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _, total = model(batch[:, :-1], batch[:, 1:])
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        opt.step()
        times.append(time.perf_counter() - start)
    return times[warmup:]


def run_megatron(cfg, steps: int, warmup: int) -> list[float]:
    from megatron_moe.training import Trainer

    trainer = Trainer(cfg, quiet=True)
    times = []
    for _ in range(steps + warmup):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    return times[warmup:]


def worker(argv: list[str]) -> None:
    """One measurement in this process: `--worker plain|megatron OUT.json overrides...`."""
    import tempfile

    from megatron_moe.config import load_run_config

    kind, out, steps, warmup, *overrides = argv
    cfg = load_run_config(None, [*overrides, f"train.output_dir={tempfile.mkdtemp()}"])
    fn = run_plain if kind == "plain" else run_megatron
    times = fn(cfg, int(steps), int(warmup))
    with open(out, "w") as f:
        json.dump(times, f)


def measure(kind: str, overrides: list[str], args) -> float:
    """Median step seconds of `kind` in a fresh process."""
    import tempfile

    out = tempfile.mktemp(suffix=".json")
    subprocess.run(
        [sys.executable, __file__, "--worker", kind, out, str(args.steps), str(args.warmup), *overrides],
        check=True, capture_output=True, text=True,
    )
    with open(out) as f:
        return statistics.median(json.load(f))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    p.add_argument("--repeats", type=int, default=2, help="alternating measurements per path (median taken)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    from megatron_moe.config import load_run_config
    from megatron_moe.planner import match_dense

    tokens = args.batch * args.seq
    results = {}
    moe_cfg = load_run_config(None, model_overrides(args, moe=True))
    matched = match_dense(moe_cfg.model, "active")
    dense_active = model_overrides(args, moe=False) + [
        f"model.ffn_hidden_size={matched.config.ffn_hidden_size}",
        f"model.hidden_size={matched.config.hidden_size}",
    ]
    cases = {
        "dense": model_overrides(args, moe=False),
        "moe": model_overrides(args, moe=True),
        "dense_active_matched": dense_active,
    }
    for name, overrides in cases.items():
        paths = ("megatron", "plain") if name != "dense_active_matched" else ("megatron",)
        times = {k: [] for k in paths}
        for _ in range(args.repeats):
            for kind in paths:
                times[kind].append(measure(kind, overrides, args))
        results[name] = {k: tokens / statistics.median(v) for k, v in times.items()}
        line = f"{name:22s} megatron-core {results[name]['megatron']:9,.0f} tok/s"
        if "plain" in results[name]:
            results[name]["ratio"] = results[name]["megatron"] / results[name]["plain"]
            line += f" | plain PyTorch {results[name]['plain']:9,.0f} tok/s | ratio {results[name]['ratio']:.3f}"
        print(line, flush=True)
    results["moe_step_over_active_dense_step"] = results["dense_active_matched"]["megatron"] / results["moe"]["megatron"]
    print(f"MoE step time / active-matched dense step time: {results['moe_step_over_active_dense_step']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
