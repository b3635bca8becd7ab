"""Equal-resources MoE families (arXiv 2506.12119): a dense baseline and MoE arms across a grid of activation
rates r_a, all with equal non-embedding parameters N, training compute C and unique tokens D. Each arm's
consumed tokens are C / its FLOPs per token, so lower r_a means more tokens.

Two data-reuse schemes, as in the study: strict (every arm's unique tokens are D, the dense baseline's
consumed tokens; an MoE arm repeats them consumed / D times) and fresh (each arm reads fresh tokens up to its
budget: unique tokens = consumed tokens, one epoch). The study's "loose" scheme (2 epochs for every arm, so arms
read unique sets of different sizes) is not offered: its arms cannot share one data stream. Three ways to spend N on experts (`granularity`): free
(K, E and D_e all chosen per arm), hold_top_k (K fixed, E and D_e chosen) and hold_expert_size (D_e fixed, K
and E chosen).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from megatron_moe.config import ConfigError, ModelConfig, validate_model
from megatron_moe.schema import changed_fields
from megatron_moe.text import human
from megatron_moe.planner.ledger import FlopConvention, Ledger, Resize, Shape, ledger, numbers_of, shape_of
from megatron_moe.planner.match import DEFAULT_MULTIPLE_OF, DEFAULT_TOLERANCE_PCT, config_of, dense_of, solve_dense


Granularity = Literal["free", "hold_top_k", "hold_expert_size"]
GRANULARITIES: tuple[str, ...] = typing.get_args(Granularity)
Reuse = Literal["strict", "fresh"]
REUSES: tuple[str, ...] = typing.get_args(Reuse)


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
    unique_tokens: int
    """Distinct tokens this arm trains on: the family's D (strict reuse) or its consumed tokens (fresh)."""
    repeats: float
    """Epochs over this arm's unique tokens: consumed_tokens / unique_tokens (1 under fresh reuse)."""
    changed_fields: tuple[str, ...]
    """Fields that differ from the source config."""

    @property
    def r_a(self) -> float:
        return self.ledger.r_a

    def granularity(self) -> dict[str, int]:
        """E, K, D_e and D_se (all 0 for a dense arm)."""
        m = self.config
        if not m.is_moe:
            return {"experts": 0, "top_k": 0, "expert_ffn": 0, "shared_ffn": 0}
        return {"experts": m.moe.num_experts, "top_k": m.moe.top_k, "expert_ffn": m.expert_ffn,
                "shared_ffn": m.moe.shared_expert_ffn_hidden_size}

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(config=dataclasses.asdict(self.config), ledger=self.ledger.to_dict(), r_a=self.r_a,
                   changed_fields=list(self.changed_fields), granularity=self.granularity())
        return out


@dataclass(frozen=True)
class Family:
    """Dense baseline and MoE arms with equal total parameters N, compute C and unique tokens D."""

    total_params: int
    """N: non-embedding parameters of the dense baseline."""
    unique_tokens: int
    """D: the dense baseline's training tokens (one epoch); under strict reuse every arm's unique tokens."""
    compute: int
    """C: training FLOPs of the dense baseline over D tokens."""
    flops: str
    """FLOP convention used for C and consumed tokens."""
    dense: FamilyMember
    members: tuple[FamilyMember, ...]
    reuse: Reuse = "strict"
    """'strict' (every arm's unique tokens = D) or 'fresh' (unique tokens = consumed tokens)."""
    granularity: Granularity = "free"
    """'free', 'hold_top_k' or 'hold_expert_size': which of K, E, D_e the planner chose per arm."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_params": self.total_params,
            "unique_tokens": self.unique_tokens,
            "compute": self.compute,
            "flops": self.flops,
            "reuse": self.reuse,
            "granularity": self.granularity,
            "dense": self.dense.to_dict(),
            "members": [m.to_dict() for m in self.members],
        }


DEFAULT_R_A_GRID = (0.1, 0.15, 0.2, 0.25, 0.3)
DEFAULT_TOP_K = (2, 3, 4, 6, 8)


def _er_option(name: str, plan_flag: bool = True) -> str:
    """Where an equal-resources option is set: the `plan` flag and the study field of the same name."""
    study = f"study.equal_resources.{name}"
    return f"plan --{name.replace('_', '-')}, {study}" if plan_flag else study


def _bad(name: str, value: Any, allowed: str, plan_flag: bool = True) -> ConfigError:
    return ConfigError(f"equal-resources {name} = {value} is not allowed: {allowed} ({_er_option(name, plan_flag)})")


def _check_family_inputs(
    r_a_grid: tuple[float, ...], total_params: int | None, unique_tokens: int | None, tokens_per_param: float,
    top_k_choices: tuple[int, ...], max_experts: int, multiple_of: int, granularity: str, reuse: str,
    expert_ffn_hidden_size: int | None,
) -> None:
    """One-line ConfigErrors, naming the option, for equal-resources inputs out of range."""
    bad = _bad
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
    if granularity not in GRANULARITIES:
        raise bad("granularity", repr(granularity), f"expected one of {', '.join(map(repr, GRANULARITIES))}", False)
    if reuse not in REUSES:
        raise bad("reuse", repr(reuse), f"expected one of {', '.join(map(repr, REUSES))}", False)
    if granularity == "hold_top_k" and len(set(top_k_choices)) != 1:
        raise bad("top_k", list(top_k_choices), "granularity = 'hold_top_k' keeps K fixed across r_a: give one "
                  "value, e.g. top_k = [2]")
    if expert_ffn_hidden_size is not None and expert_ffn_hidden_size < 1:
        raise bad("expert_ffn_hidden_size", expert_ffn_hidden_size, "the held expert size D_e must be >= 1", False)


def explicit_dense(model_cfg: ModelConfig, layers: int = 0, hidden: int = 0, ffn: int = 0
                   ) -> tuple[ModelConfig, Resize | None] | None:
    """An explicit dense baseline shape, as `equal_resources_family`'s (dense_cfg, dense_resize); None when all
    three are 0 (the baseline is the widened MoE backbone).

    Depth `layers` and width `hidden` default to the MoE backbone's (0). The head dimension is kept (heads =
    hidden / head_dim, query groups scaled alike), since a wider dense model adds heads rather than widening
    them. `ffn` > 0 fixes the FFN (resize None: used exactly); 0 lets the planner resize the FFN to hit N.
    """
    if not (layers or hidden or ffn):
        return None
    for name, v in (("dense_layers", layers), ("dense_hidden", hidden), ("dense_ffn", ffn)):
        if v < 0:
            raise _bad(name, v, "must be >= 0 (0 = the MoE backbone's)", False)
    dense = dense_of(model_cfg)
    if layers:
        dense = dataclasses.replace(dense, num_layers=layers)
    if hidden and hidden != model_cfg.hidden_size:
        head_dim = model_cfg.hidden_size // model_cfg.num_attention_heads
        per_group = model_cfg.num_attention_heads // model_cfg.kv_heads
        heads = hidden // head_dim
        if hidden % head_dim or heads % per_group:
            raise _bad("dense_hidden", hidden, f"keeping the backbone's head dimension {head_dim} and "
                       f"{per_group} heads per query group needs a multiple of {head_dim * per_group}", False)
        groups = heads // per_group if model_cfg.num_query_groups else 0
        dense = dataclasses.replace(dense, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups)
    if ffn:
        return dataclasses.replace(dense, ffn_hidden_size=ffn), None
    return dense, "ffn"


def _dense_baseline(model_cfg: ModelConfig, total_params: int | None, dense_cfg: ModelConfig | None,
                    dense_resize: Resize | None, tensor: int, multiple_of: int, tolerance_pct: float) -> ModelConfig:
    """The family's dense baseline, which defines N (see `equal_resources_family`)."""

    def n_of(s: Shape) -> int:
        return numbers_of(s).nonemb_total

    if dense_cfg is None and not model_cfg.is_moe and total_params is None:
        return model_cfg
    dense_src = dense_of(dense_cfg if dense_cfg is not None else model_cfg)
    if dense_resize is None:  # an exact shape: it defines N, or must already be within the tolerance of it
        if total_params is not None:
            n = ledger(dense_src, tensor).nonembedding_params
            resid = 100.0 * (n - total_params) / total_params
            if abs(resid) > tolerance_pct:
                shape, _ = solve_dense(dense_src, total_params, n_of, tensor=tensor, multiple_of=multiple_of,
                                       resize="ffn", tolerance_pct=tolerance_pct, what="equal-resources dense baseline")
                raise ConfigError(
                    f"equal-resources dense baseline ({dense_src.num_layers} layers, hidden {dense_src.hidden_size}, "
                    f"ffn {dense_src.ffn_hidden_size}) has N = {human(n)}, {resid:+.2f}% from total_params = "
                    f"{human(total_params)}, beyond tolerance_pct = {tolerance_pct:g}%: set dense_ffn = {shape.ffn} "
                    f"(the nearest match), 0 (resize it), or total_params = 0 (the dense baseline defines N)"
                )
        return dense_src
    n_total = total_params if total_params is not None else ledger(model_cfg, tensor).nonembedding_params
    shape, _ = solve_dense(dense_src, n_total, n_of, tensor=tensor, multiple_of=multiple_of, resize=dense_resize,
                           tolerance_pct=tolerance_pct, what="equal-resources dense baseline")
    dense = config_of(dense_src, shape)
    resid = 100.0 * (ledger(dense, tensor).nonembedding_params - n_total) / n_total
    if abs(resid) > tolerance_pct:
        raise ConfigError(
            f"equal-resources dense baseline: no legal width at {dense.num_layers} layers (resize {dense_resize}) "
            f"has N within tolerance_pct = {tolerance_pct:g}% of {human(n_total)} (nearest {resid:+.2f}%); "
            f"lower multiple_of ({_er_option('multiple_of')}) or change the dense shape"
        )
    return dense


def _layouts(base: Shape, n_total: int, granularity: str, top_k_choices: tuple[int, ...], max_experts: int,
             expert: int, step: int, held_d_e: int) -> tuple[list[tuple[float, float, int, int, int]], float, float]:
    """Candidate (r_a, N residual %, K, E, D_e) around N, and the smallest and largest N any layout has.

    N is linear in D_e (the shared expert is K x D_e), so with D_e free it is solved for and the two nearest
    legal values kept; with D_e held every (K, E) is a candidate.
    """
    candidates: list[tuple[float, float, int, int, int]] = []
    smallest_n, largest_n = math.inf, 0.0 if held_d_e else math.inf

    def add(k: int, e: int, d_e: int) -> None:
        nums = numbers_of(base._replace(experts=e, top_k=k, expert_ffn=d_e, shared_ffn=k * d_e))
        resid = 100.0 * (nums.nonemb_total - n_total) / n_total
        candidates.append((nums.nonemb_active / nums.nonemb_total, resid, k, e, d_e))

    for k in sorted(set(top_k_choices)):
        for e in range(max(k + 1, expert), max_experts + 1):
            if e % expert:
                continue
            s = base._replace(experts=e, top_k=k)
            if granularity == "hold_expert_size":
                n = numbers_of(s._replace(expert_ffn=held_d_e, shared_ffn=k * held_d_e)).nonemb_total
                smallest_n, largest_n = min(smallest_n, n), max(largest_n, n)
                add(k, e, held_d_e)
                continue
            n1 = numbers_of(s._replace(expert_ffn=step, shared_ffn=k * step)).nonemb_total
            n2 = numbers_of(s._replace(expert_ffn=2 * step, shared_ffn=2 * k * step)).nonemb_total
            smallest_n = min(smallest_n, n1)
            units = (n_total - n1) / (n2 - n1) + 1
            for u in {max(1, math.floor(units)), max(1, math.ceil(units))}:
                add(k, e, u * step)
    return candidates, smallest_n, largest_n


def equal_resources_family(
    model_cfg: ModelConfig,
    r_a_grid: tuple[float, ...] = DEFAULT_R_A_GRID,
    *,
    total_params: int | None = None,
    dense_cfg: ModelConfig | None = None,
    dense_resize: Resize | None = "ffn+hidden",
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
    granularity: Granularity = "free",
    expert_ffn_hidden_size: int | None = None,
    reuse: Reuse = "strict",
) -> Family:
    """The equal-resources study's family: MoE arms over `r_a_grid` plus a dense baseline, equal N, C, D.

    `model_cfg` is the MoE backbone: every arm keeps its depth, width, attention, vocabulary, dense-layer
    FFN (`ffn_hidden_size`) and router settings.

    The dense baseline defines N (non-embedding parameters) exactly; the MoE arms are matched to it. It is
    `dense_cfg` (default: the source with moe.num_experts = 0; `explicit_dense` builds one of another depth
    and width) resized at fixed depth to `total_params`, else to the source's own N (`dense_resize`; left as
    is when the source is dense and N is its own). `dense_resize=None` takes `dense_cfg` exactly: its N is the
    family's N, and with `total_params` given it must lie within `tolerance_pct` of it.
    D = `unique_tokens` or tokens_per_param x N, and C = dense training FLOPs/token x D.

    Each MoE arm has layout first_k_dense (default: the source's if MoE, else 1, as in the study) and
    every_n, one shared expert of size K x D_e, and (K, E, D_e) with K from top_k_choices, K < E <=
    max_experts, E divisible by `expert`, and D_e by `granularity`: 'free' and 'hold_top_k' (one K, so K is
    the same for every arm) solve D_e (a multiple of lcm(tensor, multiple_of)) for N; 'hold_expert_size'
    keeps D_e = `expert_ffn_hidden_size` (default: the source's expert size) and varies K and E. Among
    choices whose N is within `tolerance_pct`: the nearest r_a (to 0.005), then the smallest N residual (to
    0.1%), then the smallest K and fewest experts. Each arm consumes floor(C / its FLOPs per token) tokens;
    under `reuse='strict'` its unique tokens are D (that / D repeats), under 'fresh' its consumed tokens (one
    epoch). Raises ConfigError, naming the reachable range, when a target r_a is further than
    `r_a_rel_tolerance` x target from every reachable one, and when no layout's N is within `tolerance_pct`
    of the baseline's (naming the smallest N a layout has).
    """
    _check_family_inputs(tuple(r_a_grid), total_params, unique_tokens, tokens_per_param, tuple(top_k_choices),
                         max_experts, multiple_of, granularity, reuse, expert_ffn_hidden_size)
    src_moe = model_cfg.moe
    step = math.lcm(tensor, multiple_of)
    dense = _dense_baseline(model_cfg, total_params, dense_cfg, dense_resize, tensor, multiple_of, tolerance_pct)
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
        unique = d_unique if reuse == "strict" else consumed
        return FamilyMember(
            name=name, config=cfg, target_r_a=target_r_a, ledger=led,
            params_residual_pct=100.0 * (led.nonembedding_params - n_total) / n_total,
            flops_per_token=led.train_flops(flops), consumed_tokens=consumed, unique_tokens=unique,
            repeats=consumed / unique, changed_fields=changed_fields(model_cfg, cfg, "model"),
        )

    fkd = first_k_dense if first_k_dense is not None else (src_moe.first_k_dense if model_cfg.is_moe else 1)
    n_every = every_n if every_n is not None else (src_moe.every_n if model_cfg.is_moe else 1)
    if not 0 <= fkd < model_cfg.num_layers or n_every < 1:
        raise ConfigError(
            f"equal-resources layout first_k_dense = {fkd}, every_n = {n_every} leaves no MoE layer in "
            f"model.num_layers = {model_cfg.num_layers}"
        )
    held_d_e = 0
    if granularity == "hold_expert_size":
        held_d_e = expert_ffn_hidden_size or model_cfg.expert_ffn
        if held_d_e % tensor:
            raise _bad("expert_ffn_hidden_size", held_d_e, f"must be divisible by parallel.tensor = {tensor}", False)
    layout = dataclasses.replace(
        model_cfg,
        moe=dataclasses.replace(src_moe, num_experts=max(2, expert), top_k=1, expert_ffn_hidden_size=step,
                                shared_expert_ffn_hidden_size=step, first_k_dense=fkd, every_n=n_every),
    )
    base = shape_of(layout, tensor)
    candidates, smallest_n, largest_n = _layouts(base, n_total, granularity, tuple(top_k_choices), max_experts, expert, step,
                                      held_d_e)
    if not candidates:
        raise ConfigError(f"no MoE layout: top_k_choices = {list(top_k_choices)}, max_experts = {max_experts}")
    d_e_words = f"expert size held at {held_d_e}" if held_d_e else f"expert size a multiple of {step}"
    backbone = (f"{model_cfg.num_layers} layers, width {model_cfg.hidden_size}, first_k_dense = {fkd}, "
                f"every_n = {n_every}, top_k in {sorted(set(top_k_choices))}, <= {max_experts} experts, {d_e_words}")
    within = [c for c in candidates if abs(c[1]) <= tolerance_pct]
    if not within:  # no arm could have equal N: an error, not an arm with another N
        target = r_a_grid[0]
        near = [c for c in candidates if abs(c[0] - target) <= r_a_rel_tolerance * target] or candidates
        best = min(near, key=lambda c: abs(c[1]))
        if smallest_n > n_total:
            hint = (f"the smallest MoE layout has N = {human(smallest_n)}: raise total_params "
                    f"({_er_option('total_params')}) to about that or more, or use a smaller backbone")
        elif largest_n < n_total:
            hint = (f"the largest MoE layout with D_e held at {held_d_e} has N = {human(largest_n)}: raise max_experts "
                    f"({_er_option('max_experts')}) or expert_ffn_hidden_size")
        elif held_d_e:
            per_expert = numbers_of(base._replace(experts=3, top_k=1, expert_ffn=held_d_e, shared_ffn=held_d_e)
                                    ).nonemb_total - numbers_of(base._replace(experts=2, top_k=1, expert_ffn=held_d_e,
                                                                              shared_ffn=held_d_e)).nonemb_total
            hint = (f"with D_e held, N moves in steps of {human(per_expert)} ({100 * per_expert / n_total:.2f}% of N) "
                    f"per expert: lower expert_ffn_hidden_size ({_er_option('expert_ffn_hidden_size', False)}) "
                    f"or raise the tolerance")
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
        dense=member("dense", dense, 1.0), members=tuple(members), reuse=reuse, granularity=granularity,
    )
