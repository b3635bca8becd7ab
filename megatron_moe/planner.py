"""Budget planner: parameter and FLOP ledger for any model config, and matched dense baselines.

Everything here is closed-form arithmetic on a `ModelConfig`; nothing imports torch or megatron-core, so
planning thousands of configs takes milliseconds (`tools/bench_planner.py`). The counts are exact for the
model that `megatron_moe.model.build_model` builds (tests/test_planner.py checks them against the built
megatron-core model, with tensor- and expert-parallel shards summed).

Parameters
    Components: embedding (word rows, padded by `padded_vocab_size`, plus learned absolute positions),
    attention (QKV and output projection), dense_mlp, routed_experts, shared_experts, router, norms and
    output_layer (zero when tied to the embedding). No biases (megatron-moe builds add_bias_linear=False);
    LayerNorm has a weight and a bias, RMSNorm a weight. *Active* parameters are those one token uses:
    everything except the routed experts, of which top_k per MoE layer. *Non-embedding* excludes the
    embedding and output layer (as in the equal-resources study). The activation rate is
    r_a = non-embedding active / non-embedding total.

FLOPs per token (one formula for dense and MoE; a multiply-add is 2 FLOPs)
    forward = 2 x (weights a token multiplies: attention projections, dense MLP, top_k routed experts,
    shared experts, router, and the logits over the padded vocabulary - counted even when tied)
    + attention scores and values, 4 x S_kv x (heads x head_dim) per layer, where S_kv = S: every query
    is scored against all S keys, which is what megatron-core's unfused attention computes (the causal
    mask is applied after the full S x S product). With `causal_attention=True`, S_kv = (S + 1) / 2, the
    mean number of keys a query may see (what a causal flash-attention kernel does).
    training = 3 x forward (backward = 2 x forward; activation recompute not counted).
    Norms, softmax, activations, RoPE and the loss are elementwise and not counted. This equals
    torch.utils.flop_counter.FlopCounterMode on the model built with the local (non-TE) layer spec (tested).

Equal-resources convention (arXiv 2506.12119), reported alongside for comparison
    training FLOPs per token = 6 x N_a + 12 x D_m x S x L, with N_a the non-embedding active parameters
    (norms and router included; the paper's closed form drops them, a < 0.1% difference at their sizes).
    It omits the logits and counts attention without causal halving.

Matching
    A matched dense baseline is the source config with `moe.num_experts = 0` and its width resized at fixed
    depth: `ffn_hidden_size` (default), or `hidden_size` and `ffn_hidden_size` together. Nothing else
    changes (other `moe.*` fields stay and are ignored by a dense model); `Match.changed_fields` lists the
    dotted fields that differ. Contracts: `active` (dense params = MoE active params), `total` (= MoE total
    params), `flops` (dense training FLOPs/token = MoE's). `equal_resources_family` builds the study's
    family: equal total parameters N, compute C and unique tokens D across a grid of activation rates.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from megatron_moe.config import (
    ConfigError, ModelConfig, RunConfig, apply_overrides, from_dict, load_toml, save_toml, validate, validate_model,
)
from megatron_moe.utils import atomic_write_json

COMPONENTS = (
    "embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "router", "norms", "output_layer",
)
"""Ledger components, in display order (the names `megatron_moe.model.component_of` uses)."""
EMBEDDING_COMPONENTS = ("embedding", "output_layer")
"""Components left out of the non-embedding counts."""
CONTRACTS = ("active", "total", "flops")
"""Dense matching contracts (`equal-resources` is a family, see `equal_resources_family`)."""

Contract = Literal["active", "total", "flops"]
Resize = Literal["ffn", "ffn+hidden"]
Count = Literal["non_embedding", "all"]
FlopConvention = Literal["exact", "equal_resources"]

DEFAULT_MULTIPLE_OF = 8
"""Default granularity of resized widths: bf16 tensor cores want multiples of 8; FP8 GEMMs and
grouped-GEMM expert kernels want 16 (pass `multiple_of=16`)."""
DEFAULT_TOLERANCE_PCT = 0.5
"""A match whose residual exceeds this only because the target is below the smallest legal width fails."""


def padded_vocab_size(model_cfg: ModelConfig, tensor: int = 1) -> int:
    """Vocabulary rows actually built: vocab_size rounded up to a multiple of 128 x tensor-parallel size."""
    multiple = 128 * tensor
    return -(-model_cfg.vocab_size // multiple) * multiple


# ---------------------------------------------------------------- ledger


class _Shape(NamedTuple):
    """The integers the counts depend on (a cheap stand-in for ModelConfig inside the solvers)."""

    vocab: int  # padded
    seq: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    ffn_matrices: int  # 3 for gated (SwiGLU), 2 otherwise
    norm_vectors: int  # 2 for LayerNorm (weight, bias), 1 for RMSNorm
    learned_positions: bool
    tied: bool
    moe_layers: int
    experts: int
    top_k: int
    expert_ffn: int
    shared_ffn: int


def _num_moe_layers(m: ModelConfig) -> int:
    e = m.moe
    if e.num_experts == 0 or e.first_k_dense >= m.num_layers:
        return 0
    return len(range(e.first_k_dense, m.num_layers, max(e.every_n, 1)))


def _shape(m: ModelConfig, tensor: int) -> _Shape:
    moe_layers = _num_moe_layers(m)
    return _Shape(
        vocab=padded_vocab_size(m, tensor),
        seq=m.seq_length,
        layers=m.num_layers,
        hidden=m.hidden_size,
        heads=m.num_attention_heads,
        kv_heads=m.kv_heads,
        ffn=m.ffn_hidden_size,
        ffn_matrices=3 if m.activation == "swiglu" else 2,
        norm_vectors=2 if m.normalization == "LayerNorm" else 1,
        learned_positions=m.position_embedding == "learned_absolute",
        tied=m.tie_embeddings,
        moe_layers=moe_layers,
        experts=m.moe.num_experts if moe_layers else 0,
        top_k=m.moe.top_k if moe_layers else 0,
        expert_ffn=m.expert_ffn if moe_layers else 0,
        shared_ffn=m.moe.shared_expert_ffn_hidden_size if moe_layers else 0,
    )


class _Numbers(NamedTuple):
    total: tuple[int, ...]  # per COMPONENTS
    active: tuple[int, ...]
    nonemb_total: int
    nonemb_active: int
    attention_flops: int  # scores + values, forward, per token, all layers
    flops_fwd: int
    flops_er: int


def _numbers(s: _Shape, causal_attention: bool = False) -> _Numbers:
    """All counts for one shape; the single source of truth for the ledger and the solvers."""
    d = s.hidden
    head_dim = d // s.heads
    q_dim = s.heads * head_dim
    dense_layers = s.layers - s.moe_layers
    embedding = s.vocab * d + (s.seq * d if s.learned_positions else 0)
    output_layer = 0 if s.tied else s.vocab * d
    attention = s.layers * (d * (s.heads + 2 * s.kv_heads) * head_dim + q_dim * d)
    dense_mlp = dense_layers * s.ffn_matrices * d * s.ffn
    expert = s.ffn_matrices * d * s.expert_ffn
    routed_total = s.moe_layers * s.experts * expert
    routed_active = s.moe_layers * s.top_k * expert
    shared = s.moe_layers * s.ffn_matrices * d * s.shared_ffn
    router = s.moe_layers * s.experts * d
    norms = (2 * s.layers + 1) * s.norm_vectors * d
    total = (embedding, attention, dense_mlp, routed_total, shared, router, norms, output_layer)
    active = (embedding, attention, dense_mlp, routed_active, shared, router, norms, output_layer)
    nonemb_total = attention + dense_mlp + routed_total + shared + router + norms
    nonemb_active = attention + dense_mlp + routed_active + shared + router + norms
    if causal_attention:
        attention_flops = 2 * (s.seq + 1) * q_dim * s.layers  # 4 x (S + 1) / 2 keys on average
    else:
        attention_flops = 4 * s.seq * q_dim * s.layers
    matmul_weights = attention + dense_mlp + routed_active + shared + router + s.vocab * d
    flops_fwd = 2 * matmul_weights + attention_flops
    flops_er = 6 * nonemb_active + 12 * d * s.seq * s.layers
    return _Numbers(total, active, nonemb_total, nonemb_active, attention_flops, flops_fwd, flops_er)


@dataclass(frozen=True)
class Ledger:
    """Parameter and FLOP accounting of one model config (see the module docstring for conventions)."""

    total: dict[str, int]
    """Parameters per component (keys: COMPONENTS)."""
    active: dict[str, int]
    """Parameters one token uses, per component."""
    padded_vocab_size: int
    """Embedding rows built (vocab_size padded for the tensor-parallel size)."""
    tensor: int
    """Tensor-parallel size the vocabulary was padded for."""
    moe_layers: int
    """Layers holding an MoE block."""
    causal_attention: bool
    """Whether attention FLOPs count (S + 1) / 2 keys per query (True) or all S keys (False)."""
    attention_flops_fwd_per_token: int
    """Attention scores and values (QK^T and AV), forward, per token, all layers."""
    flops_fwd_per_token: int
    """Forward FLOPs per token: 2 x multiplied weights (incl. router and logits) + attention scores/values."""
    flops_er_per_token: int
    """Training FLOPs per token in the equal-resources convention: 6 x N_a + 12 x D_m x S x L."""

    @property
    def flops_train_per_token(self) -> int:
        """Training FLOPs per token: forward + backward = 3 x forward."""
        return 3 * self.flops_fwd_per_token

    @property
    def total_params(self) -> int:
        return sum(self.total.values())

    @property
    def active_params(self) -> int:
        return sum(self.active.values())

    @property
    def nonembedding_params(self) -> int:
        """N: total parameters without embedding and output layer."""
        return sum(v for k, v in self.total.items() if k not in EMBEDDING_COMPONENTS)

    @property
    def nonembedding_active_params(self) -> int:
        """N_a: active parameters without embedding and output layer."""
        return sum(v for k, v in self.active.items() if k not in EMBEDDING_COMPONENTS)

    @property
    def r_a(self) -> float:
        """Activation rate N_a / N (non-embedding); 1 for a dense model."""
        return self.nonembedding_active_params / self.nonembedding_params

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: the fields plus the derived totals."""
        out = dataclasses.asdict(self)
        for name in ("total_params", "active_params", "nonembedding_params", "nonembedding_active_params",
                     "r_a", "flops_train_per_token"):
            out[name] = getattr(self, name)
        return out


def _ledger_from(s: _Shape, tensor: int, causal_attention: bool) -> Ledger:
    n = _numbers(s, causal_attention)
    return Ledger(
        total=dict(zip(COMPONENTS, n.total)),
        active=dict(zip(COMPONENTS, n.active)),
        padded_vocab_size=s.vocab,
        tensor=tensor,
        moe_layers=s.moe_layers,
        causal_attention=causal_attention,
        attention_flops_fwd_per_token=n.attention_flops,
        flops_fwd_per_token=n.flops_fwd,
        flops_er_per_token=n.flops_er,
    )


def ledger(model_cfg: ModelConfig, tensor: int = 1, *, causal_attention: bool = False) -> Ledger:
    """Parameters by component (total and active), r_a and FLOPs per token of `model_cfg`.

    `tensor` only matters through vocabulary padding; totals are the sum over all shards (each parameter
    counted once, whatever the tensor- or expert-parallel layout).
    """
    return _ledger_from(_shape(model_cfg, tensor), tensor, causal_attention)


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
            "changes": {f: _get_dotted(self.config, f) for f in self.changed_fields},
            "config": dataclasses.asdict(self.config),
            "ledger": self.ledger.to_dict(),
        }


def changed_fields(source: Any, other: Any, prefix: str = "model") -> tuple[str, ...]:
    """Dotted names (`model.…`) of the fields in which two configs of the same dataclass differ."""
    out: list[str] = []
    for name in type(source).__dataclass_fields__:
        a, b = getattr(source, name), getattr(other, name)
        if hasattr(type(a), "__dataclass_fields__"):
            out.extend(changed_fields(a, b, f"{prefix}.{name}"))
        elif a != b:
            out.append(f"{prefix}.{name}")
    return tuple(out)


def _get_dotted(m: ModelConfig, dotted: str) -> Any:
    node: Any = m
    for part in dotted.split(".")[1:]:
        node = getattr(node, part)
    return node


def _quantity(contract: str, count: Count, flops: FlopConvention) -> str:
    if contract == "flops":
        return "training FLOPs/token" + (" (6*N_a + 12*D_m*S*L)" if flops == "equal_resources" else "")
    base = "non-embedding parameters" if count == "non_embedding" else "parameters"
    return ("active " if contract == "active" else "total ") + base


def _metric(n: _Numbers, contract: str, count: Count, flops: FlopConvention) -> int:
    if contract == "flops":
        return 3 * n.flops_fwd if flops == "exact" else n.flops_er
    if contract == "active":
        return n.nonemb_active if count == "non_embedding" else sum(n.active)
    return n.nonemb_total if count == "non_embedding" else sum(n.total)


def _fmt(x: float) -> str:
    """Short human number: 1.23M, 4.5e12 style."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{unit}"
    return f"{x:.4g}"


def _best_ffn(s: _Shape, target: int, value, step: int) -> tuple[int, int]:
    """The legal ffn (a positive multiple of `step`) whose value is nearest `target`; (ffn, value).

    `value(shape)` is linear in ffn (parameters and FLOPs are), so two evaluations give the solution.
    """
    v1 = value(s._replace(ffn=step))
    slope = value(s._replace(ffn=2 * step)) - v1  # value gained per `step` of ffn
    units = (target - v1) / slope + 1 if slope > 0 else 1.0
    best_units = min({max(1, math.floor(units)), max(1, math.ceil(units))},
                     key=lambda u: (abs(v1 + (u - 1) * slope - target), u))
    return best_units * step, v1 + (best_units - 1) * slope


def _hidden_step(dense: ModelConfig, multiple_of: int) -> int:
    """Legal hidden sizes are multiples of this: heads x head_dim, head_dim a multiple of lcm(2, multiple_of)
    (even for RoPE, aligned for the attention GEMMs)."""
    return dense.num_attention_heads * math.lcm(2, multiple_of)


def _solve_dense(
    dense: ModelConfig,
    target: int,
    value,
    *,
    tensor: int,
    multiple_of: int,
    resize: Resize,
    tolerance_pct: float,
    what: str,
) -> tuple[_Shape, int]:
    """Resize a dense config's width at fixed depth so that value(shape) is nearest target.

    resize='ffn': the legal ffn nearest the target. resize='ffn+hidden': the hidden sizes around the
    source's ffn/hidden ratio scaled to the target, each with its best ffn; among those within
    `tolerance_pct` the one whose ratio is nearest the source's (else the nearest to the target).
    """
    if multiple_of < 1:
        raise ConfigError(f"multiple_of = {multiple_of} must be >= 1")
    ffn_step = math.lcm(tensor, multiple_of)
    hidden_step = _hidden_step(dense, multiple_of)
    ratio = dense.ffn_hidden_size / dense.hidden_size
    s = _shape(dense, tensor)
    if resize == "ffn":
        candidates = [s]
    elif resize == "ffn+hidden":

        def scaled(units: int) -> int:
            h = units * hidden_step
            return value(s._replace(hidden=h, ffn=max(ffn_step, round(ratio * h))))

        # The width (in hidden steps) at the source's ratio that reaches the target, by bisection.
        lo, hi = 1, max(2, 2 * (dense.hidden_size // hidden_step + 1))
        while scaled(hi) < target:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if scaled(mid) < target else (lo, mid)
        candidates = [s._replace(hidden=u * hidden_step) for u in range(max(1, lo - 1), hi + 2)]
    else:
        raise ConfigError(f"resize = {resize!r} is not allowed; expected one of 'ffn', 'ffn+hidden'")
    solved = []
    for c in candidates:
        ffn, v = _best_ffn(c, target, value, ffn_step)
        solved.append((c._replace(ffn=ffn), v))

    def ratio_error(x: tuple[_Shape, int]) -> float:
        return abs(math.log(x[0].ffn / x[0].hidden / ratio))

    within = [x for x in solved if 100 * abs(x[1] - target) <= tolerance_pct * target]
    if within:
        shape, achieved = min(within, key=lambda x: (ratio_error(x), abs(x[1] - target)))
    else:
        shape, achieved = min(solved, key=lambda x: (abs(x[1] - target), ratio_error(x)))
    smallest_shape = s._replace(ffn=ffn_step) if resize == "ffn" else s._replace(hidden=hidden_step, ffn=ffn_step)
    smallest = value(smallest_shape)
    if target < smallest and 100 * (achieved - target) / target > tolerance_pct:
        legal = f"ffn_hidden_size a multiple of {ffn_step}"
        if resize != "ffn":
            legal += f", hidden_size a multiple of {hidden_step}"
        raise ConfigError(
            f"{what}: target {_fmt(target)} is below the smallest legal dense width ({legal}) at "
            f"{dense.num_layers} layers; reachable: >= {_fmt(smallest)}"
        )
    return shape, achieved


def _dense_of(model_cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe, num_experts=0))


def _config_of(dense: ModelConfig, s: _Shape) -> ModelConfig:
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
    source = _numbers(_shape(model_cfg, tensor), causal_attention)
    target = _metric(source, contract, count, flops)
    dense = _dense_of(model_cfg)

    def value(s: _Shape) -> int:
        return _metric(_numbers(s, causal_attention), contract, count, flops)

    shape, achieved = _solve_dense(
        dense, target, value, tensor=tensor, multiple_of=multiple_of, resize=resize,
        tolerance_pct=tolerance_pct, what=f"dense match '{contract}' ({_quantity(contract, count, flops)})",
    )
    config = _config_of(dense, shape)
    validate_model(config, tensor)
    return Match(
        contract=contract,
        quantity=_quantity(contract, count, flops),
        config=config,
        target=target,
        achieved=achieved,
        residual_pct=100.0 * (achieved - target) / target,
        changed_fields=changed_fields(model_cfg, config),
        ledger=_ledger_from(shape, tensor, causal_attention),
    )


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
        dense_src = _dense_of(dense_cfg if dense_cfg is not None else model_cfg)

        def n_of(s: _Shape) -> int:
            return _numbers(s).nonemb_total

        shape, _ = _solve_dense(dense_src, n_total, n_of, tensor=tensor, multiple_of=multiple_of,
                                resize=dense_resize, tolerance_pct=tolerance_pct,
                                what="equal-resources dense baseline")
        dense = _config_of(dense_src, shape)
    dense_ledger = ledger(dense, tensor, causal_attention=causal_attention)
    n_total = dense_ledger.nonembedding_params  # the baseline defines N exactly; arms are matched to it
    d_unique = unique_tokens if unique_tokens is not None else round(tokens_per_param * n_total)
    if d_unique <= 0:
        raise ConfigError(f"unique-token budget {d_unique} must be > 0")

    def flops_of(led: Ledger) -> int:
        return led.flops_train_per_token if flops == "exact" else led.flops_er_per_token

    compute = flops_of(dense_ledger) * d_unique

    def member(name: str, cfg: ModelConfig, target_r_a: float) -> FamilyMember:
        validate_model(cfg, tensor, expert if cfg.is_moe else 1)
        led = ledger(cfg, tensor, causal_attention=causal_attention)
        consumed = compute // flops_of(led)
        return FamilyMember(
            name=name, config=cfg, target_r_a=target_r_a, ledger=led,
            params_residual_pct=100.0 * (led.nonembedding_params - n_total) / n_total,
            flops_per_token=flops_of(led), consumed_tokens=consumed, repeats=consumed / d_unique,
            changed_fields=changed_fields(model_cfg, cfg),
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
    base = _shape(layout, tensor)
    # Enumerate (K, E, D_e): N is linear in D_e, so solve for it and keep the two nearest legal values.
    candidates: list[tuple[float, float, int, int, int]] = []  # (r_a, N residual %, K, E, D_e)
    smallest_n = math.inf  # the smallest N of any layout (D_e = one step)
    for k in top_k_choices:
        for e in range(max(k + 1, expert), max_experts + 1):
            if e % expert:
                continue
            s = base._replace(experts=e, top_k=k)
            n1 = _numbers(s._replace(expert_ffn=step, shared_ffn=k * step)).nonemb_total
            n2 = _numbers(s._replace(expert_ffn=2 * step, shared_ffn=2 * k * step)).nonemb_total
            smallest_n = min(smallest_n, n1)
            units = (n_total - n1) / (n2 - n1) + 1
            for u in {max(1, math.floor(units)), max(1, math.ceil(units))}:
                nums = _numbers(s._replace(expert_ffn=u * step, shared_ffn=k * u * step))
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
            hint = (f"the smallest MoE layout has N = {_fmt(smallest_n)}: raise total_params "
                    f"({_er_option('total_params')}) to about that or more, or use a smaller backbone")
        else:
            hint = f"expert sizes are too coarse at this N: lower multiple_of ({_er_option('multiple_of')})"
        raise ConfigError(
            f"equal-resources arm r_a = {target:g}: no MoE layout has N within tolerance_pct = {tolerance_pct:g}% "
            f"of the dense baseline's N = {_fmt(n_total)} with {backbone} (nearest: {best[1]:+.1f}% at r_a "
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
                f"activation rate r_a = {target:g} is not reachable at N = {_fmt(n_total)} with {backbone}; "
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
        f"FLOPs/token: forward {_fmt(led.flops_fwd_per_token)}, training {_fmt(led.flops_train_per_token)} "
        f"(exact; attention {attn}); equal-resources 6*N_a + 12*D_m*S*L = {_fmt(led.flops_er_per_token)}"
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
            f"{_fmt(m.ledger.flops_train_per_token):>17}"
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
            f"{m.params_residual_pct:>+10.3f}{m.r_a:>8.4f}{_fmt(m.flops_per_token):>11}"
            f"{m.consumed_tokens:>18,}{m.repeats:>9.2f}"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------- the `plan` command


def _load_plan_config(path: str, overrides: list[str]) -> RunConfig:
    """A run config (tables [model], [parallel], ...) or a bare model config (model keys at top level)."""
    data = load_toml(path)
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    if data and "model" not in data and set(data) <= model_keys:
        data = {"model": data}
    cfg = from_dict(RunConfig, apply_overrides(data, list(overrides)))
    validate(cfg)
    return cfg


def _arm_run_config(run_cfg: RunConfig, model: ModelConfig) -> RunConfig:
    """The source run config with only the model replaced (and parallel.expert = 1 for a dense model,
    which megatron-moe requires)."""
    parallel = run_cfg.parallel
    if not model.is_moe and parallel.expert != 1:
        parallel = dataclasses.replace(parallel, expert=1)
    arm = dataclasses.replace(run_cfg, model=model, parallel=parallel)
    validate(arm)
    return arm


def plan_main(
    config_path: str,
    overrides: list[str] = (),
    *,
    match: str = "all",
    as_json: bool = False,
    write_dir: str | None = None,
    multiple_of: int = DEFAULT_MULTIPLE_OF,
    resize: Resize = "ffn",
    count: Count = "non_embedding",
    causal_attention: bool = False,
    r_a_grid: tuple[float, ...] = DEFAULT_R_A_GRID,
    total_params: int | None = None,
    unique_tokens: int | None = None,
    tokens_per_param: float = 20.0,
    top_k_choices: tuple[int, ...] = DEFAULT_TOP_K,
    max_experts: int = 256,
) -> int:
    """`megatron-moe plan`: print the ledger and matched configs; optionally write them as run configs."""
    if match not in ("all", *CONTRACTS, "equal-resources"):
        choices = ", ".join(("all", *CONTRACTS, "equal-resources"))
        raise ConfigError(f"--match {match!r} is not allowed; expected one of {choices}")
    run_cfg = _load_plan_config(config_path, overrides)
    m, par = run_cfg.model, run_cfg.parallel
    led = ledger(m, par.tensor, causal_attention=causal_attention)
    contracts = CONTRACTS if match == "all" else (match,) if match in CONTRACTS else ()
    matches = [
        match_dense(m, c, par.tensor, multiple_of=multiple_of, resize=resize, count=count,
                    causal_attention=causal_attention)
        for c in contracts
    ]
    family = None
    if match == "equal-resources":
        family = equal_resources_family(
            m, tuple(r_a_grid), total_params=total_params, unique_tokens=unique_tokens,
            tokens_per_param=tokens_per_param, top_k_choices=tuple(top_k_choices), max_experts=max_experts,
            tensor=par.tensor, expert=par.expert, multiple_of=multiple_of, causal_attention=causal_attention,
        )
    arms = {f"dense_{x.contract}": x.config for x in matches}
    if family is not None:
        arms.update({f"er_{a.name}": a.config for a in (family.dense, *family.members)})
    arm_cfgs = {name: _arm_run_config(run_cfg, cfg) for name, cfg in arms.items()}

    plan = {
        "config": str(config_path),
        "tensor": par.tensor,
        "ledger": led.to_dict(),
        "matches": [x.to_dict() for x in matches],
        "equal_resources": family.to_dict() if family is not None else None,
        "written": {},
    }
    if write_dir is not None:
        out = Path(write_dir)
        save_toml(run_cfg, out / "source.toml")
        for name, cfg in arm_cfgs.items():
            save_toml(cfg, out / f"{name}.toml")
            plan["written"][name] = str(out / f"{name}.toml")
        atomic_write_json(out / "plan.json", plan)
    if as_json:
        print(json.dumps(plan, indent=2))
        return 0
    kind = (f"MoE: {m.moe.num_experts} experts, top-{m.moe.top_k}, {led.moe_layers} of {m.num_layers} layers MoE"
            if m.is_moe else f"dense, {m.num_layers} layers")
    print(format_ledger(led, f"{config_path}  ({kind}; hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, "
                             f"seq {m.seq_length}; tensor {par.tensor})"))
    if matches:
        legal = f"ffn_hidden_size a multiple of {math.lcm(par.tensor, multiple_of)}"
        if resize == "ffn+hidden":
            legal += f", hidden_size a multiple of {_hidden_step(m, multiple_of)}"
        print(f"\nmatched dense configs: the source with model.moe.num_experts = 0 and width resized at fixed depth "
              f"({legal}); no other field changes")
        print(format_matches(matches))
    if family is not None:
        print()
        print(format_family(family))
    if write_dir is not None:
        print(f"\nwrote {len(arm_cfgs)} run configs, source.toml and plan.json to {write_dir}")
        changed_parallel = [n for n, c in arm_cfgs.items() if c.parallel != par]
        if changed_parallel:
            print(f"note: parallel.expert set to 1 in {', '.join(changed_parallel)} (a dense model has no experts)")
    return 0
