"""The planner's tables: the ledger, matches, an equal-resources family and a config's plan (columns sized to their
contents by `text.table`, so they stay aligned at any magnitude)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_moe.planner.ledger import COMPONENTS
from megatron_moe.text import human, human_bytes, table

if TYPE_CHECKING:
    from megatron_moe.planner.family import Family
    from megatron_moe.planner.ledger import Ledger
    from megatron_moe.planner.match import Match
    from megatron_moe.planner.memory import MemoryEstimate
    from megatron_moe.planner.plan import ConfigPlan


def format_ledger(led: Ledger, title: str = "") -> str:
    """A readable table: parameters by component (total, active), totals, r_a and FLOPs per token."""
    rows = [[c, f"{led.total[c]:,}", f"{led.active[c]:,}"] for c in COMPONENTS]
    rows.append(["all", f"{led.total_params:,}", f"{led.active_params:,}"])
    rows.append(["non-embedding (N, N_a)", f"{led.nonembedding_params:,}", f"{led.nonembedding_active_params:,}"])
    lines = [title] if title else []
    lines += table(["component", "total", "active"], rows)
    lines.append(f"r_a = N_a / N = {led.r_a:.4f}    vocab rows {led.padded_vocab_size:,} (tensor {led.tensor})")
    attn = "(S+1)/2 keys/query, causal" if led.causal_attention else "S keys/query, no causal halving"
    lines.append(
        f"FLOPs/token: forward {human(led.flops_fwd_per_token)}, training {human(led.flops_train_per_token)} "
        f"(exact; attention {attn}); equal-resources 6*N_a + 12*D_m*S*L = {human(led.flops_er_per_token)}"
    )
    return "\n".join(lines)


def format_matches(matches: list[Match]) -> str:
    """One row per matched dense config: target, achieved, residual and the resized fields."""
    header = ["contract", "matched quantity", "target", "achieved", "resid %", "hidden", "ffn", "params",
              "train FLOPs/tok"]
    rows = [[m.contract, m.quantity, f"{m.target:,}", f"{m.achieved:,}", f"{m.residual_pct:+.3f}",
             str(m.config.hidden_size), str(m.config.ffn_hidden_size), f"{m.ledger.total_params:,}",
             human(m.ledger.flops_train_per_token)] for m in matches]
    return "\n".join(table(header, rows, "ll"))


def format_family(fam: Family) -> str:
    """The equal-resources family as a table: one row per arm, with its granularity (E, K, D_e, D_se), tokens
    and epochs."""
    conv = "6*N_a + 12*D_m*S*L" if fam.flops == "equal_resources" else "exact"
    reuse = ("strict reuse: every arm's unique tokens are D" if fam.reuse == "strict" else
             "fresh reuse: each arm's unique tokens are its consumed tokens, one epoch")
    header = ["arm", "layers", "hidden", "ffn", "E", "K", "D_e", "D_se", "N", "N resid %", "r_a", "FLOPs/tok",
              "tokens", "unique", "epochs"]
    rows = []
    for m in (fam.dense, *fam.members):
        g = m.granularity()
        rows.append([m.name, str(m.config.num_layers), str(m.config.hidden_size), str(m.config.ffn_hidden_size),
                     str(g["experts"]), str(g["top_k"]), str(g["expert_ffn"]), str(g["shared_ffn"]),
                     f"{m.ledger.nonembedding_params:,}", f"{m.params_residual_pct:+.3f}", f"{m.r_a:.4f}",
                     human(m.flops_per_token), f"{m.consumed_tokens:,}", f"{m.unique_tokens:,}", f"{m.repeats:.2f}"])
    return "\n".join([
        f"equal resources: N = {fam.total_params:,} non-embedding params, D = {fam.unique_tokens:,} tokens "
        f"(the dense arm's), C = {fam.compute:.4g} FLOPs ({conv}); {reuse}; granularity {fam.granularity}",
        *table(header, rows),
    ])


def format_plan(plan: ConfigPlan, title: str, limit: tuple[int | None, str] = (None, "")) -> str:
    """What `megatron-moe plan` prints: the ledger, the matched configs and the family."""
    m, par, led = plan.source.model, plan.source.parallel, plan.ledger
    kind = (f"MoE: {m.moe.num_experts} experts, top-{m.moe.top_k}, {led.moe_layers} of {m.num_layers} layers MoE"
            if m.is_moe else f"dense, {m.num_layers} layers")
    parts = [format_ledger(led, f"{title}  ({kind}; hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, "
                                f"seq {m.seq_length}; tensor {par.tensor})")]
    if plan.matches:
        parts.append(f"\nmatched dense configs: the source with model.moe.num_experts = 0 and width resized at "
                     f"fixed depth ({plan.legal_widths}); no other field changes")
        parts.append(format_matches(plan.matches))
    if plan.family is not None:
        parts.append("")
        parts.append(format_family(plan.family))
    parts.append("")
    parts.append(format_memory(plan.memory, limit))
    return "\n".join(parts)


def format_memory(memory: dict[str, MemoryEstimate], limit: tuple[int | None, str] = (None, "")) -> str:
    """Memory per GPU of each named config (its fullest pipeline stage), itemised, with the layout it assumes and,
    given a `limit` (bytes, where it came from), whether each fits."""
    any_est = next(iter(memory.values()))
    header = ["config", "stage", "params/GPU", "weights", "grads", "optimizer", "activations", "total"]
    rows = []
    for name, est in memory.items():
        g = est.per_gpu
        over = "" if limit[0] is None else ("  over" if g.total > limit[0] else "  fits")
        rows.append([name, f"{g.stage + 1}/{len(est.stages)}", human(g.params), *(human_bytes(getattr(g, p)) for p in
                     ("weights", "grads", "optimizer", "activations")), human_bytes(g.total) + over])
    fits = f"; checked against {limit[1]}" if limit[0] is not None else ""
    return "\n".join([
        f"memory per GPU on world size {any_est.world_size} ({any_est.precision}, recompute {any_est.recompute}; "
        f"data parallel {any_est.data_parallel}, expert data parallel {any_est.expert_data_parallel}; the fullest "
        f"pipeline stage; activations estimated, CUDA context and workspace not counted{fits}):",
        *table(header, rows, "l"),
    ])
