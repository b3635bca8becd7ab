"""The plain-PyTorch baseline the bench measures our megatron-core path against.

`plain_model` builds the same model as `model.build_model` in plain PyTorch (`PlainGPT`: embedding, pre-norm
blocks with fused-QKV GQA attention through `scaled_dot_product_attention` and RoPE, SwiGLU/GELU MLP or a
top-k MoE with a micro-batch balancing loss and z-loss whatever `model.moe.aux_loss` or expert bias the config
names: they change no parameter and little work), with the planner ledger's parameter count; `run_plain` trains it with
the AdamW megatron-core uses and clipping, eager or `torch.compile`d, and returns its mean step time.
"""

from __future__ import annotations

import contextlib
import time

from megatron_moe.config import RunConfig
from megatron_moe.planner.ledger import padded_vocab_size


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
            out = self.dispatch(flat, chosen, weights.to(x.dtype))
            if self.shared is not None:
                out = out + self.shared(flat)
            return out.view_as(x)

        # Token counts per expert are data-dependent shapes: torch.compile leaves this part eager on purpose
        # (one stated graph break per MoE layer) rather than breaking wherever it first meets them.
        @torch.compiler.disable
        def dispatch(self, flat, chosen, weights):
            out = torch.zeros_like(flat)
            for i, expert in enumerate(self.experts):
                rows, slot = (chosen == i).nonzero(as_tuple=True)
                if rows.numel():
                    out.index_add_(0, rows, (expert(flat[rows]) * weights[rows, slot, None]).to(out.dtype))
            return out

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


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step, batches: list, warmup: int) -> float:
    """Mean seconds per call of `step(batch)` over `batches` after the first `warmup` of them.

    The timed calls run back to back between one device synchronisation before and one after, so nothing of the
    caller's adds a host sync to the measured path; batches are on the device before timing starts.
    """
    for batch in batches[:warmup]:
        step(batch)
    timed = batches[warmup:]
    sync()
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    sync()
    return (time.perf_counter() - start) / len(timed)


def megatron_uses_fused_adam() -> bool:
    """Whether megatron-core's optimizer is a fused Adam (Transformer Engine's or apex's) rather than torch's AdamW."""
    from megatron.core import optimizer

    return not optimizer.USING_PYTORCH_OPTIMIZER


def plain_description(compile_model: bool, on_gpu: bool) -> str:
    """What the baseline side runs, in words, for the bench output."""
    adam = "fused AdamW" if megatron_uses_fused_adam() and on_gpu else "torch AdamW (foreach)" if on_gpu else "torch AdamW"
    amp = "bf16 autocast over fp32 weights" if on_gpu else "fp32"
    what = "torch.compile'd (MoE token dispatch left eager)" if compile_model else "eager"
    return f"plain PyTorch, {what}, {amp}, {adam} (the Adam megatron-core uses here), global-norm clipping"


def run_plain(cfg: RunConfig, steps: int, warmup: int, compile_model: bool) -> float:
    """Mean step time of the plain-PyTorch model (AdamW, clipping, micro-batch accumulation as configured)."""
    import torch

    from megatron_moe.data.source import build_data_source
    from megatron_moe.train.trainer import resolve_precision

    t = cfg.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(t.seed)
    model = plain_model(cfg.model).to(device)
    # The same Adam implementation megatron-core picked, so the optimizer is not a difference between the sides.
    fused = device.type == "cuda" and megatron_uses_fused_adam()
    opt = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
        weight_decay=t.weight_decay, fused=fused or None,
    )
    step_fn = torch.compile(model) if compile_model else model
    # Mixed precision where our path trains in bf16 or FP8 (the baseline has no FP8: bf16 there).
    params_dtype, _ = resolve_precision(t.precision, device.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if params_dtype != torch.float32 else None
    data = build_data_source(cfg.data, cfg.model.seq_length, t.global_batch_size, t.train_steps)
    micro = t.global_batch_size // t.micro_batch_size

    def step(batch):
        opt.zero_grad(set_to_none=True)
        for chunk in batch.chunk(micro):
            with amp or contextlib.nullcontext():
                _, total = step_fn(chunk[:, :-1], chunk[:, 1:])
            (total / micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        opt.step()

    batches = [torch.from_numpy(data.train_batch(i)).to(device) for i in range(steps + warmup)]
    return time_steps(step, batches, warmup)
