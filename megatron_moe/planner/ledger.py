"""The parameter and FLOP ledger: closed-form counts for any `ModelConfig`, exact for the model that
`megatron_moe.model.build_model` builds (tested against the built megatron-core model, with tensor- and
expert-parallel shards summed). Nothing here imports torch or megatron-core, so planning thousands of configs
takes milliseconds (`tools/bench_planner.py`).

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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from megatron_moe.config import ModelConfig


COMPONENTS = (
    "embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "router", "norms", "output_layer",
)
"""Ledger components, in display order (the names `megatron_moe.model.component_of` uses)."""


EMBEDDING_COMPONENTS = ("embedding", "output_layer")
"""Components left out of the non-embedding counts."""


Resize = Literal["ffn", "ffn+hidden"]


Count = Literal["non_embedding", "all"]


FlopConvention = Literal["exact", "equal_resources"]


def padded_vocab_size(model_cfg: ModelConfig, tensor: int = 1) -> int:
    """Vocabulary rows actually built: vocab_size rounded up to a multiple of 128 x tensor-parallel size."""
    multiple = 128 * tensor
    return -(-model_cfg.vocab_size // multiple) * multiple


# ---------------------------------------------------------------- ledger


class Shape(NamedTuple):
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


def shape_of(m: ModelConfig, tensor: int) -> Shape:
    moe_layers = sum(m.moe_layer_pattern())  # the layers the model builder makes MoE
    return Shape(
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


class Numbers(NamedTuple):
    total: tuple[int, ...]  # per COMPONENTS
    active: tuple[int, ...]
    nonemb_total: int
    nonemb_active: int
    attention_flops: int  # scores + values, forward, per token, all layers
    flops_fwd: int
    flops_er: int


def numbers_of(s: Shape, causal_attention: bool = False) -> Numbers:
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
    return Numbers(total, active, nonemb_total, nonemb_active, attention_flops, flops_fwd, flops_er)


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

    def train_flops(self, convention: FlopConvention) -> int:
        """Training FLOPs per token in a convention: "exact" (this ledger's count) or "equal_resources"."""
        return self.flops_train_per_token if convention == "exact" else self.flops_er_per_token

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


def ledger_from(s: Shape, tensor: int, causal_attention: bool) -> Ledger:
    n = numbers_of(s, causal_attention)
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
    return ledger_from(shape_of(model_cfg, tensor), tensor, causal_attention)
