"""Dense baselines matched to an MoE.

A matched dense baseline is the source config with `moe.num_experts = 0` and its width resized at fixed
depth: `ffn_hidden_size` (default), or `hidden_size` and `ffn_hidden_size` together. Nothing else changes
(other `moe.*` fields stay and are ignored by a dense model); `Match.changed_fields` lists the dotted fields
that differ. Contracts: `active` (dense params = MoE active params), `total` (= MoE total params), `flops`
(dense training FLOPs/token = MoE's). The residual (achieved - target) / target is reported with every match.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from megatron_moe.config import ConfigError, ModelConfig, validate_model
from megatron_moe.schema import changed_fields, get_dotted
from megatron_moe.text import human
from megatron_moe.planner.ledger import Count, FlopConvention, Ledger, Numbers, Resize, Shape, ledger_from, numbers_of, shape_of


Contract = Literal["active", "total", "flops"]
CONTRACTS: tuple[str, ...] = typing.get_args(Contract)
"""Dense matching contracts (`equal-resources` is a family, see `equal_resources_family`)."""


DEFAULT_MULTIPLE_OF = 8
"""Default granularity of resized widths: bf16 tensor cores want multiples of 8; FP8 GEMMs and
grouped-GEMM expert kernels want 16 (pass `multiple_of=16`)."""


DEFAULT_TOLERANCE_PCT = 0.5
"""A match whose residual exceeds this only because the target is below the smallest legal width fails."""


# ---------------------------------------------------------------- dense matching


@dataclass(frozen=True)
class Match:
    """A dense config matched to a source config under one contract."""

    contract: str
    """active, total or flops."""
    quantity: str
    """What was matched, in words (e.g. 'non-embedding parameters')."""
    config: ModelConfig
    """The dense config: the source with moe.num_experts = 0 and resized width."""
    target: int
    """The source's value of the matched quantity."""
    achieved: int
    """The dense config's value."""
    residual_pct: float
    """100 x (achieved - target) / target."""
    changed_fields: tuple[str, ...]
    """Dotted fields (under `model.`) that differ from the source config."""
    ledger: Ledger
    """The dense config's ledger."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "contract": self.contract,
            "quantity": self.quantity,
            "target": self.target,
            "achieved": self.achieved,
            "residual_pct": self.residual_pct,
            "changed_fields": list(self.changed_fields),
            "changes": {f: get_dotted(self.config, f.removeprefix("model.")) for f in self.changed_fields},
            "config": dataclasses.asdict(self.config),
            "ledger": self.ledger.to_dict(),
        }


def _quantity(contract: str, count: Count, flops: FlopConvention) -> str:
    if contract == "flops":
        return "training FLOPs/token" + (" (6*N_a + 12*D_m*S*L)" if flops == "equal_resources" else "")
    base = "non-embedding parameters" if count == "non_embedding" else "parameters"
    return ("active " if contract == "active" else "total ") + base


def _metric(n: Numbers, contract: str, count: Count, flops: FlopConvention) -> int:
    if contract == "flops":
        return 3 * n.flops_fwd if flops == "exact" else n.flops_er
    if contract == "active":
        return n.nonemb_active if count == "non_embedding" else sum(n.active)
    return n.nonemb_total if count == "non_embedding" else sum(n.total)


def _best_ffn(s: Shape, target: int, value, step: int) -> tuple[int, int]:
    """The legal ffn (a positive multiple of `step`) whose value is nearest `target`; (ffn, value).

    `value(shape)` is linear in ffn (parameters and FLOPs are), so two evaluations give the solution.
    """
    v1 = value(s._replace(ffn=step))
    slope = value(s._replace(ffn=2 * step)) - v1  # value gained per `step` of ffn
    units = (target - v1) / slope + 1 if slope > 0 else 1.0
    best_units = min({max(1, math.floor(units)), max(1, math.ceil(units))},
                     key=lambda u: (abs(v1 + (u - 1) * slope - target), u))
    return best_units * step, v1 + (best_units - 1) * slope


def hidden_step(dense: ModelConfig, multiple_of: int) -> int:
    """Legal hidden sizes are multiples of this: heads x head_dim, head_dim a multiple of lcm(2, multiple_of)
    (even for RoPE, aligned for the attention GEMMs)."""
    return dense.num_attention_heads * math.lcm(2, multiple_of)


def solve_dense(
    dense: ModelConfig,
    target: int,
    value,
    *,
    tensor: int,
    multiple_of: int,
    resize: Resize,
    tolerance_pct: float,
    what: str,
) -> tuple[Shape, int]:
    """Resize a dense config's width at fixed depth so that value(shape) is nearest target.

    resize='ffn': the legal ffn nearest the target. resize='ffn+hidden': the hidden sizes around the
    source's ffn/hidden ratio scaled to the target, each with its best ffn; among those within
    `tolerance_pct` the one whose ratio is nearest the source's (else the nearest to the target).
    """
    if multiple_of < 1:
        raise ConfigError(f"multiple_of = {multiple_of} must be >= 1")
    ffn_step = math.lcm(tensor, multiple_of)
    h_step = hidden_step(dense, multiple_of)
    ratio = dense.ffn_hidden_size / dense.hidden_size
    s = shape_of(dense, tensor)
    if resize == "ffn":
        candidates = [s]
    elif resize == "ffn+hidden":

        def scaled(units: int) -> int:
            h = units * h_step
            return value(s._replace(hidden=h, ffn=max(ffn_step, round(ratio * h))))

        # The width (in hidden steps) at the source's ratio that reaches the target, by bisection.
        lo, hi = 1, max(2, 2 * (dense.hidden_size // h_step + 1))
        while scaled(hi) < target:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if scaled(mid) < target else (lo, mid)
        candidates = [s._replace(hidden=u * h_step) for u in range(max(1, lo - 1), hi + 2)]
    else:
        raise ConfigError(f"resize = {resize!r} is not allowed; expected one of 'ffn', 'ffn+hidden'")
    solved = []
    for c in candidates:
        ffn, v = _best_ffn(c, target, value, ffn_step)
        solved.append((c._replace(ffn=ffn), v))

    def ratio_error(x: tuple[Shape, int]) -> float:
        return abs(math.log(x[0].ffn / x[0].hidden / ratio))

    within = [x for x in solved if 100 * abs(x[1] - target) <= tolerance_pct * target]
    if within:
        shape, achieved = min(within, key=lambda x: (ratio_error(x), abs(x[1] - target)))
    else:
        shape, achieved = min(solved, key=lambda x: (abs(x[1] - target), ratio_error(x)))
    smallest_shape = s._replace(ffn=ffn_step) if resize == "ffn" else s._replace(hidden=h_step, ffn=ffn_step)
    smallest = value(smallest_shape)
    if target < smallest and 100 * (achieved - target) / target > tolerance_pct:
        raise ConfigError(
            f"{what}: target {human(target)} is below the smallest legal dense width "
            f"({legal_widths(dense, tensor, multiple_of, resize)}) at "
            f"{dense.num_layers} layers; reachable: >= {human(smallest)}"
        )
    return shape, achieved


def legal_widths(dense: ModelConfig, tensor: int, multiple_of: int, resize: Resize) -> str:
    """The widths a resized dense model may take, in words."""
    legal = f"ffn_hidden_size a multiple of {math.lcm(tensor, multiple_of)}"
    if resize != "ffn":
        legal += f", hidden_size a multiple of {hidden_step(dense, multiple_of)}"
    return legal


def dense_of(model_cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe, num_experts=0))


def config_of(dense: ModelConfig, s: Shape) -> ModelConfig:
    return dataclasses.replace(dense, hidden_size=s.hidden, ffn_hidden_size=s.ffn)


def match_dense(
    model_cfg: ModelConfig,
    contract: Contract,
    tensor: int = 1,
    *,
    multiple_of: int = DEFAULT_MULTIPLE_OF,
    resize: Resize = "ffn",
    count: Count = "non_embedding",
    flops: FlopConvention = "exact",
    causal_attention: bool = False,
    tolerance_pct: float = DEFAULT_TOLERANCE_PCT,
) -> Match:
    """The dense config matched to `model_cfg` under `contract`, resized in width at fixed depth.

    Legal widths: ffn_hidden_size a positive multiple of lcm(tensor, multiple_of); with
    resize='ffn+hidden' also hidden_size = heads x head_dim with head_dim a multiple of lcm(2, multiple_of),
    keeping the source's ffn/hidden ratio as nearly as a match within `tolerance_pct` allows. `count`
    chooses whether the parameter contracts compare non-embedding or all parameters; `flops` which FLOP
    convention the flops contract uses. Raises ConfigError when the target lies below the smallest legal
    width.
    """
    if contract not in CONTRACTS:
        raise ConfigError(f"contract {contract!r} is not allowed; expected one of {', '.join(CONTRACTS)}")
    if multiple_of < 1:
        raise ConfigError(f"multiple_of = {multiple_of} must be >= 1 (plan --multiple-of, study.match.multiple_of)")
    source = numbers_of(shape_of(model_cfg, tensor), causal_attention)
    target = _metric(source, contract, count, flops)
    dense = dense_of(model_cfg)

    def value(s: Shape) -> int:
        return _metric(numbers_of(s, causal_attention), contract, count, flops)

    shape, achieved = solve_dense(
        dense, target, value, tensor=tensor, multiple_of=multiple_of, resize=resize,
        tolerance_pct=tolerance_pct, what=f"dense match '{contract}' ({_quantity(contract, count, flops)})",
    )
    config = config_of(dense, shape)
    validate_model(config, tensor)
    return Match(
        contract=contract,
        quantity=_quantity(contract, count, flops),
        config=config,
        target=target,
        achieved=achieved,
        residual_pct=100.0 * (achieved - target) / target,
        changed_fields=changed_fields(model_cfg, config, "model"),
        ledger=ledger_from(shape, tensor, causal_attention),
    )
