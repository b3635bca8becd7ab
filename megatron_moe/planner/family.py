"""Equal-resources MoE families (arXiv 2506.12119): a dense baseline and MoE arms across a grid of activation
rates r_a, all with equal non-embedding parameters N, training compute C and unique tokens D. Each arm's
consumed tokens are C / its FLOPs per token, so lower r_a means more passes over the same D.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from megatron_moe.config import ConfigError, ModelConfig, changed_fields, validate_model
from megatron_moe.planner.format import human
from megatron_moe.planner.ledger import FlopConvention, Ledger, Resize, Shape, ledger, numbers_of, shape_of
from megatron_moe.planner.match import DEFAULT_MULTIPLE_OF, DEFAULT_TOLERANCE_PCT, config_of, dense_of, solve_dense


# ---------------------------------------------------------------- equal-resources family


@dataclass(frozen=True)
class FamilyMember:
    """One arm of an equal-resources family."""

    name: str
    """'dense' or 'moe_ra0.20' (target activation rate)."""
    config: ModelConfig
    target_r_a: float
    """Requested activation rate (1 for the dense baseline)."""
    ledger: Ledger
    params_residual_pct: float
    """100 x (N of this arm - N of the dense baseline) / N."""
    flops_per_token: int
    """Training FLOPs per token under the family's convention."""
    consumed_tokens: int
    """Training tokens that spend the family's compute C: floor(C / flops_per_token)."""
    repeats: float
    """Epochs over the unique-token budget: consumed_tokens / unique_tokens."""
    changed_fields: tuple[str, ...]
    """Fields that differ from the source config."""

    @property
    def r_a(self) -> float:
        return self.ledger.r_a

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(config=dataclasses.asdict(self.config), ledger=self.ledger.to_dict(), r_a=self.r_a,
                   changed_fields=list(self.changed_fields))
        return out


@dataclass(frozen=True)
class Family:
    """Dense baseline and MoE arms with equal total parameters N, compute C and unique tokens D."""

    total_params: int
    """N: non-embedding parameters of the dense baseline."""
    unique_tokens: int
    """D: unique-token budget (the dense baseline trains one epoch over it)."""
    compute: int
    """C: training FLOPs of the dense baseline over D tokens."""
    flops: str
    """FLOP convention used for C and consumed tokens."""
    dense: FamilyMember
    members: tuple[FamilyMember, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_params": self.total_params,
            "unique_tokens": self.unique_tokens,
            "compute": self.compute,
            "flops": self.flops,
            "dense": self.dense.to_dict(),
            "members": [m.to_dict() for m in self.members],
        }


DEFAULT_R_A_GRID = (0.1, 0.15, 0.2, 0.25, 0.3)
DEFAULT_TOP_K = (2, 3, 4, 6, 8)


def _er_option(name: str) -> str:
    """Where an equal-resources option is set: the `plan` flag and the study field of the same name."""
    return f"plan --{name.replace('_', '-')}, study.equal_resources.{name}"


def _check_family_inputs(
    r_a_grid: tuple[float, ...], total_params: int | None, unique_tokens: int | None, tokens_per_param: float,
    top_k_choices: tuple[int, ...], max_experts: int, multiple_of: int,
) -> None:
    """One-line ConfigErrors, naming the option, for equal-resources inputs out of range."""

    def bad(name: str, value: Any, allowed: str) -> ConfigError:
        return ConfigError(f"equal-resources {name} = {value} is not allowed: {allowed} ({_er_option(name)})")

    if not r_a_grid:
        raise bad("r_a", "[]", "give at least one activation rate in (0, 1)")
    for r in r_a_grid:
        if not (math.isfinite(r) and 0 < r < 1):
            raise bad("r_a", f"{r:g}", "activation rates must be in (0, 1)")
    if total_params is not None and total_params <= 0:
        raise bad("total_params", total_params, "N must be > 0")
    if unique_tokens is not None and unique_tokens <= 0:
        raise bad("unique_tokens", unique_tokens, "D must be > 0")
    if not (math.isfinite(tokens_per_param) and tokens_per_param > 0):
        raise bad("tokens_per_param", f"{tokens_per_param:g}", "must be a finite number > 0")
    if not top_k_choices:
        raise bad("top_k", "[]", "give at least one top-k >= 1")
    for k in top_k_choices:
        if k < 1:
            raise bad("top_k", k, "top-k choices must be >= 1")
    if max_experts < 2:
        raise bad("max_experts", max_experts, "must be >= 2")
    if multiple_of < 1:
        raise bad("multiple_of", multiple_of, "must be >= 1")


def equal_resources_family(
    model_cfg: ModelConfig,
    r_a_grid: tuple[float, ...] = DEFAULT_R_A_GRID,
    *,
    total_params: int | None = None,
    dense_cfg: ModelConfig | None = None,
    dense_resize: Resize = "ffn+hidden",
    unique_tokens: int | None = None,
    tokens_per_param: float = 20.0,
    top_k_choices: tuple[int, ...] = DEFAULT_TOP_K,
    max_experts: int = 256,
    first_k_dense: int | None = None,
    every_n: int | None = None,
    tensor: int = 1,
    expert: int = 1,
    multiple_of: int = DEFAULT_MULTIPLE_OF,
    flops: FlopConvention = "equal_resources",
    causal_attention: bool = False,
    r_a_rel_tolerance: float = 0.1,
    tolerance_pct: float = DEFAULT_TOLERANCE_PCT,
) -> Family:
    """The equal-resources study's family: MoE arms over `r_a_grid` plus a dense baseline, equal N, C, D.

    `model_cfg` is the MoE backbone: every arm keeps its depth, width, attention, vocabulary, dense-layer
    FFN (`ffn_hidden_size`) and router settings. N (non-embedding parameters) is `total_params`, else the
    source's own N. The dense baseline is `dense_cfg` (default: the source with moe.num_experts = 0)
    resized at fixed depth to N (`dense_resize`; left as is when the source is dense and N is its own).
    D = `unique_tokens` or tokens_per_param x N, and C = dense training FLOPs/token x D.

    Each MoE arm has layout first_k_dense (default: the source's if MoE, else 1, as in the study) and
    every_n, one shared expert of size K x D_e, and (K, E, D_e) from top_k_choices x (K < E <=
    max_experts, E divisible by `expert`) x legal D_e (multiple of lcm(tensor, multiple_of)): among
    choices whose N is within `tolerance_pct`, the nearest r_a (to 0.005), then the smallest N residual
    (to 0.1%), then the smallest K and fewest experts. Each arm consumes floor(C / its FLOPs per token)
    tokens, that / D repeats of the unique data. Raises ConfigError, naming the reachable range, when a
    target r_a is further than `r_a_rel_tolerance` x target from every reachable one, and when no layout's N
    is within `tolerance_pct` of the baseline's (naming the smallest N a layout has).
    """
    _check_family_inputs(tuple(r_a_grid), total_params, unique_tokens, tokens_per_param, tuple(top_k_choices),
                         max_experts, multiple_of)
    src_moe = model_cfg.moe
    step = math.lcm(tensor, multiple_of)
    n_total = total_params if total_params is not None else ledger(model_cfg, tensor).nonembedding_params
    if dense_cfg is None and not model_cfg.is_moe and total_params is None:
        dense = model_cfg
    else:
        dense_src = dense_of(dense_cfg if dense_cfg is not None else model_cfg)

        def n_of(s: Shape) -> int:
            return numbers_of(s).nonemb_total

        shape, _ = solve_dense(dense_src, n_total, n_of, tensor=tensor, multiple_of=multiple_of,
                                resize=dense_resize, tolerance_pct=tolerance_pct,
                                what="equal-resources dense baseline")
        dense = config_of(dense_src, shape)
    dense_ledger = ledger(dense, tensor, causal_attention=causal_attention)
    n_total = dense_ledger.nonembedding_params  # the baseline defines N exactly; arms are matched to it
    d_unique = unique_tokens if unique_tokens is not None else round(tokens_per_param * n_total)
    if d_unique <= 0:
        raise ConfigError(f"unique-token budget {d_unique} must be > 0")

    compute = dense_ledger.train_flops(flops) * d_unique

    def member(name: str, cfg: ModelConfig, target_r_a: float) -> FamilyMember:
        validate_model(cfg, tensor, expert if cfg.is_moe else 1)
        led = ledger(cfg, tensor, causal_attention=causal_attention)
        consumed = compute // led.train_flops(flops)
        return FamilyMember(
            name=name, config=cfg, target_r_a=target_r_a, ledger=led,
            params_residual_pct=100.0 * (led.nonembedding_params - n_total) / n_total,
            flops_per_token=led.train_flops(flops), consumed_tokens=consumed, repeats=consumed / d_unique,
            changed_fields=changed_fields(model_cfg, cfg, "model"),
        )

    fkd = first_k_dense if first_k_dense is not None else (src_moe.first_k_dense if model_cfg.is_moe else 1)
    n_every = every_n if every_n is not None else (src_moe.every_n if model_cfg.is_moe else 1)
    if not 0 <= fkd < model_cfg.num_layers or n_every < 1:
        raise ConfigError(
            f"equal-resources layout first_k_dense = {fkd}, every_n = {n_every} leaves no MoE layer in "
            f"model.num_layers = {model_cfg.num_layers}"
        )
    layout = dataclasses.replace(
        model_cfg,
        moe=dataclasses.replace(src_moe, num_experts=max(2, expert), top_k=1, expert_ffn_hidden_size=step,
                                shared_expert_ffn_hidden_size=step, first_k_dense=fkd, every_n=n_every),
    )
    base = shape_of(layout, tensor)
    # Enumerate (K, E, D_e): N is linear in D_e, so solve for it and keep the two nearest legal values.
    candidates: list[tuple[float, float, int, int, int]] = []  # (r_a, N residual %, K, E, D_e)
    smallest_n = math.inf  # the smallest N of any layout (D_e = one step)
    for k in top_k_choices:
        for e in range(max(k + 1, expert), max_experts + 1):
            if e % expert:
                continue
            s = base._replace(experts=e, top_k=k)
            n1 = numbers_of(s._replace(expert_ffn=step, shared_ffn=k * step)).nonemb_total
            n2 = numbers_of(s._replace(expert_ffn=2 * step, shared_ffn=2 * k * step)).nonemb_total
            smallest_n = min(smallest_n, n1)
            units = (n_total - n1) / (n2 - n1) + 1
            for u in {max(1, math.floor(units)), max(1, math.ceil(units))}:
                nums = numbers_of(s._replace(expert_ffn=u * step, shared_ffn=k * u * step))
                resid = 100.0 * (nums.nonemb_total - n_total) / n_total
                candidates.append((nums.nonemb_active / nums.nonemb_total, resid, k, e, u * step))
    if not candidates:
        raise ConfigError(f"no MoE layout: top_k_choices = {list(top_k_choices)}, max_experts = {max_experts}")
    backbone = (f"{model_cfg.num_layers} layers, width {model_cfg.hidden_size}, first_k_dense = {fkd}, "
                f"every_n = {n_every}, top_k in {list(top_k_choices)}, <= {max_experts} experts, expert size "
                f"a multiple of {step}")
    within = [c for c in candidates if abs(c[1]) <= tolerance_pct]
    if not within:  # no arm could have equal N: an error, not an arm with another N
        target = r_a_grid[0]
        near = [c for c in candidates if abs(c[0] - target) <= r_a_rel_tolerance * target] or candidates
        best = min(near, key=lambda c: abs(c[1]))
        if smallest_n > n_total:
            hint = (f"the smallest MoE layout has N = {human(smallest_n)}: raise total_params "
                    f"({_er_option('total_params')}) to about that or more, or use a smaller backbone")
        else:
            hint = f"expert sizes are too coarse at this N: lower multiple_of ({_er_option('multiple_of')})"
        raise ConfigError(
            f"equal-resources arm r_a = {target:g}: no MoE layout has N within tolerance_pct = {tolerance_pct:g}% "
            f"of the dense baseline's N = {human(n_total)} with {backbone} (nearest: {best[1]:+.1f}% at r_a "
            f"{best[0]:.3f}); {hint}"
        )
    lo, hi = min(c[0] for c in within), max(c[0] for c in within)
    members = []
    for target in r_a_grid:
        r_a, _, k, e, d_e = min(
            within, key=lambda c: (round(abs(c[0] - target) / 0.005), round(abs(c[1]) / 0.1), c[2], c[3])
        )
        if abs(r_a - target) > r_a_rel_tolerance * target:
            raise ConfigError(
                f"activation rate r_a = {target:g} is not reachable at N = {human(n_total)} with {backbone}; "
                f"reachable r_a: {lo:.3f} to {hi:.3f} (nearest {r_a:.3f})"
            )
        cfg = dataclasses.replace(
            layout,
            moe=dataclasses.replace(layout.moe, num_experts=e, top_k=k, expert_ffn_hidden_size=d_e,
                                    shared_expert_ffn_hidden_size=k * d_e),
        )
        members.append(member(f"moe_ra{target:.2f}", cfg, target))
    return Family(
        total_params=n_total, unique_tokens=d_unique, compute=compute, flops=flops,
        dense=member("dense", dense, 1.0), members=tuple(members),
    )
