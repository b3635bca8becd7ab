"""Human-readable output of the planner: short numbers, and the ledger, match, family and plan tables."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_moe.planner.ledger import COMPONENTS

if TYPE_CHECKING:
    from megatron_moe.planner.family import Family
    from megatron_moe.planner.ledger import Ledger
    from megatron_moe.planner.match import Match
    from megatron_moe.planner.plan import ConfigPlan


def human(x: float) -> str:
    """Short human number: 1.23M, 4.5e12 style."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{unit}"
    return f"{x:.4g}"


# ---------------------------------------------------------------- report


def format_ledger(led: Ledger, title: str = "") -> str:
    """A readable table: parameters by component (total, active), totals, r_a and FLOPs per token."""
    rows = [f"{title}" if title else ""]
    rows.append(f"{'component':<22}{'total':>16}{'active':>16}")
    for c in COMPONENTS:
        rows.append(f"{c:<22}{led.total[c]:>16,}{led.active[c]:>16,}")
    rows.append(f"{'all':<22}{led.total_params:>16,}{led.active_params:>16,}")
    rows.append(f"{'non-embedding (N, N_a)':<22}{led.nonembedding_params:>16,}{led.nonembedding_active_params:>16,}")
    rows.append(f"r_a = N_a / N = {led.r_a:.4f}    vocab rows {led.padded_vocab_size:,} (tensor {led.tensor})")
    attn = "(S+1)/2 keys/query, causal" if led.causal_attention else "S keys/query, no causal halving"
    rows.append(
        f"FLOPs/token: forward {human(led.flops_fwd_per_token)}, training {human(led.flops_train_per_token)} "
        f"(exact; attention {attn}); equal-resources 6*N_a + 12*D_m*S*L = {human(led.flops_er_per_token)}"
    )
    return "\n".join(r for r in rows if r != "")


def format_matches(matches: list[Match]) -> str:
    """One row per matched dense config: target, achieved, residual and the resized fields."""
    rows = [f"{'contract':<9}{'matched quantity':<40}{'target':>14}{'achieved':>14}{'resid %':>9}"
            f"{'hidden':>8}{'ffn':>8}{'params':>14}{'train FLOPs/tok':>17}"]
    for m in matches:
        rows.append(
            f"{m.contract:<9}{m.quantity:<40}{m.target:>14,}{m.achieved:>14,}{m.residual_pct:>+9.3f}"
            f"{m.config.hidden_size:>8}{m.config.ffn_hidden_size:>8}{m.ledger.total_params:>14,}"
            f"{human(m.ledger.flops_train_per_token):>17}"
        )
    return "\n".join(rows)


def format_family(fam: Family) -> str:
    """The equal-resources family as a table: one row per arm."""
    rows = [
        f"equal resources: N = {fam.total_params:,} non-embedding params, D = {fam.unique_tokens:,} unique tokens, "
        f"C = {fam.compute:.4g} FLOPs ({'6*N_a + 12*D_m*S*L' if fam.flops == 'equal_resources' else 'exact'})",
        f"{'arm':<12}{'hidden':>7}{'ffn':>7}{'E':>5}{'K':>4}{'D_e':>7}{'D_se':>7}{'N':>16}{'N resid %':>10}"
        f"{'r_a':>8}{'FLOPs/tok':>11}{'tokens':>18}{'repeats':>9}",
    ]
    for m in (fam.dense, *fam.members):
        e, moe = m.config.moe, m.config.is_moe
        rows.append(
            f"{m.name:<12}{m.config.hidden_size:>7}{m.config.ffn_hidden_size:>7}{e.num_experts if moe else 0:>5}"
            f"{e.top_k if moe else 0:>4}{m.config.expert_ffn if moe else 0:>7}"
            f"{e.shared_expert_ffn_hidden_size if moe else 0:>7}{m.ledger.nonembedding_params:>16,}"
            f"{m.params_residual_pct:>+10.3f}{m.r_a:>8.4f}{human(m.flops_per_token):>11}"
            f"{m.consumed_tokens:>18,}{m.repeats:>9.2f}"
        )
    return "\n".join(rows)


def format_plan(plan: ConfigPlan, title: str) -> str:
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
    return "\n".join(parts)
