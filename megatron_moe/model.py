"""The model builder: the one place that translates a `ModelConfig` into megatron-core objects.

It composes megatron-core's own layer specs (local spec on CPU or without Transformer Engine, the
Transformer Engine spec when TE is importable and CUDA is present) and returns a `GPTModel`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import re
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_moe.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from megatron_moe.planner.ledger import COMPONENTS, padded_vocab_size

@dataclass(frozen=True)
class Balancing:
    """One value of model.moe.aux_loss, in megatron-core's terms and ours."""

    router_type: str
    """megatron-core's moe_router_load_balancing_type."""
    tracked: str
    """The name megatron-core's aux-loss tracker records the loss under, which is also its metrics field."""
    short: str
    """Its name in progress lines and (with '_' for ' ') under moe/ in TensorBoard and W&B."""


BALANCING = {
    "micro_batch": Balancing("aux_loss", "load_balancing_loss", "lb"),
    "sequence": Balancing("seq_aux_loss", "seq_load_balancing_loss", "seq lb"),
    "global_batch": Balancing("global_aux_loss", "global_load_balancing_loss", "global lb"),
}
"""model.moe.aux_loss -> what it is: the one table of balancing losses."""


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def fusions(m: ModelConfig, on_gpu: bool, use_te: bool) -> dict[str, bool]:
    """megatron-core's fused kernels to use: the one place that decides them.

    On CPU none: the unfused paths compute the same functions. On CUDA, the TorchScript fusions megatron-core
    carries itself (bias + SwiGLU, bias + dropout + residual add); with Transformer Engine its fused RoPE and MoE
    token permutation; with NVIDIA apex's CUDA extensions its fused masked softmax (used only where the core
    attention falls back from SDPA) and fused weight-gradient accumulation. megatron-core's SwiGLU fusion takes
    the gated activation only: a GELU model without biases keeps the unfused path.
    """
    moe_permute = False
    if on_gpu and use_te and m.is_moe:
        from megatron.core.transformer.moe import moe_utils

        moe_permute = getattr(moe_utils, "fused_permute", None) is not None
    return dict(
        bias_activation_fusion=on_gpu and m.activation == "swiglu",
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu and _importable("scaled_masked_softmax_cuda")
        and _importable("scaled_upper_triang_masked_softmax_cuda"),
        apply_rope_fusion=on_gpu and use_te and m.position_embedding == "rope",
        gradient_accumulation_fusion=on_gpu and _importable("fused_weight_gradient_mlp_cuda"),
        persist_layer_norm=False,  # apex's persistent layer norm; the norms here are torch's or TE's
        moe_permute_fusion=moe_permute,
    )


def recompute_options(t: TrainConfig) -> dict:
    """megatron-core's activation-recompute settings for train config `t` (none when it asks for none)."""
    if t.recompute_granularity == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=t.recompute_num_layers)
    if t.recompute_granularity == "selective":
        return dict(recompute_granularity="selective", recompute_modules=list(t.recompute_modules))
    return {}


def transformer_config(
    m: ModelConfig, p: ParallelConfig, params_dtype: torch.dtype = torch.float32, fp8: bool = False,
    use_te: bool | None = None, recompute: dict | None = None,
):
    """megatron-core TransformerConfig for model `m` under layout `p` (`recompute`: `recompute_options`)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    e = m.moe
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.kv_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline if p.virtual_pipeline > 1 else None,
        expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=1,
        sequence_parallel=p.sequence_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        **fusions(m, on_gpu, have_transformer_engine() if use_te is None else use_te),
    )
    if p.virtual_pipeline > 1:
        # Megatron-LM's interleaved defaults. Batched p2p posts its sends and receives in a fixed order, so with two
        # pipeline ranks (each the other's previous and next) an activation and a gradient in flight together can
        # meet the wrong receive: over gloo the losses were seen to differ. Unbatched p2p orders them by rank parity.
        kwargs.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    if fp8:
        kwargs.update(fp8="hybrid", fp8_recipe="delayed")
    kwargs.update(recompute or {})
    if m.is_moe:
        kwargs.update(
            num_moe_experts=e.num_experts,
            moe_router_topk=e.top_k,
            moe_ffn_hidden_size=m.expert_ffn,
            moe_shared_expert_intermediate_size=e.shared_expert_ffn_hidden_size or None,
            moe_layer_freq=m.moe_layer_pattern(),
            moe_router_load_balancing_type=BALANCING[e.aux_loss].router_type if e.aux_loss_coeff > 0 else "none",
            moe_router_enable_expert_bias=e.expert_bias_update_rate > 0,
            moe_router_bias_update_rate=e.expert_bias_update_rate or 1e-3,
            moe_aux_loss_coeff=e.aux_loss_coeff,
            moe_z_loss_coeff=e.z_loss_coeff or None,
            moe_router_pre_softmax=not e.topk_renormalize,
            moe_router_score_function=e.score_function,
            moe_expert_capacity_factor=e.capacity_factor or None,
            moe_token_dispatcher_type=e.token_dispatcher,
            moe_grouped_gemm=e.grouped_gemm and on_gpu,
            moe_router_dtype="fp32",
        )
    return TransformerConfig(**kwargs)


class TorchNorm:
    """megatron-core's `WrappedTorchNorm` slot filled so that it also works with sequence parallelism.

    With sequence parallelism each tensor-parallel rank normalises its own slice of the sequence, so the
    norm weights' gradients are partial sums: marking them `sequence_parallel` makes megatron-core's
    `finalize_model_grads` all-reduce them over the tensor-parallel group (Transformer Engine's norms do
    the same). The torch norm itself is unchanged.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


@functools.lru_cache(maxsize=None)
def _sdpa_attention_class():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class SDPAttention(DotProductAttention):
        """megatron-core's local `DotProductAttention` slot computed by `F.scaled_dot_product_attention`.

        The local core attention materialises the [b, heads, s, s] scores (baddbmm, masked softmax, bmm)
        and repeats grouped K/V heads; torch's fused SDPA computes the same softmax(QK^T * scale) V with
        a flash kernel on CPU and CUDA, causal masking built in and grouped heads handled natively.
        Constructor, parameters and checkpoint layout are the parent's; cases SDPA does not express (a
        softmax offset, sliding windows, query-key layer scaling) fall back to the parent's forward.
        """

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
            mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
            plain = (
                self.softmax_offset is None
                and self.scale_mask_softmax.window_size is None
                and not self.config.apply_query_key_layer_scaling
                and attention_bias is None
                and packed_seq_params is None
                and (attention_mask is None or mask_type != AttnMaskType.causal)
            )
            if not plain:
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
            # [s, b, heads, d] -> [b, heads, s, d]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            dropout = self.attention_dropout.p if self.training else 0.0
            rng = get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel else contextlib.nullcontext()
            with rng:
                context = F.scaled_dot_product_attention(
                    q, k, v,
                    attn_mask=None if attention_mask is None else ~attention_mask,  # megatron: True = masked out
                    dropout_p=dropout,
                    is_causal=attention_mask is None and mask_type == AttnMaskType.causal,
                    scale=self.softmax_scale,
                    enable_gqa=q.shape[1] != k.shape[1],
                )
            # [b, heads, s, d] -> [s, b, heads * d]
            return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], self.hidden_size_per_partition)

    return SDPAttention


def layer_spec(m: ModelConfig, tcfg, use_te: bool, vp_stage: int | None = None):
    """The decoder block spec: megatron-core's, with dense and MoE layers placed by `moe_layer_freq`.

    With Transformer Engine it is used as is. Without it (CPU, or CUDA without TE) two slots of the
    local spec are filled: the norms (`TorchNorm`, sequence-parallel aware) and the core attention
    (`SDPAttention`, torch's fused attention instead of the unfused local one).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(tcfg, use_transformer_engine=use_te, normalization=m.normalization,
                                       vp_stage=vp_stage)
    if not use_te:
        attention = _sdpa_attention_class()
        block.layer_norm = TorchNorm
        for spec in block.layer_specs:
            spec.submodules.input_layernorm = TorchNorm
            spec.submodules.pre_mlp_layernorm = TorchNorm
            spec.submodules.self_attention.submodules.core_attention = attention
    return block


def build_model(
    m: ModelConfig,
    p: ParallelConfig,
    *,
    seed: int = 42,
    params_dtype: torch.dtype = torch.float32,
    fp8: bool = False,
    use_te: bool | None = None,
    recompute: dict | None = None,
    vp_stage: int | None = None,
):
    """Build this rank's `GPTModel` (parallel state must be initialised) with layout-independent init: with virtual
    pipeline stages, its chunk `vp_stage` (`build_model_chunks` builds them all)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if use_te is None:
        use_te = have_transformer_engine()
    if m.moe.grouped_gemm and torch.cuda.is_available() and not use_te:
        raise ConfigError("model.moe.grouped_gemm = true needs Transformer Engine on CUDA, which is not installed; "
                          "set it to false")
    tcfg = transformer_config(m, p, params_dtype, fp8, use_te, recompute)
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=layer_spec(m, tcfg, use_te, vp_stage),
        vocab_size=padded_vocab_size(m, p.tensor),
        max_sequence_length=m.seq_length,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type=m.position_embedding,
        rotary_base=m.rotary_base,
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        model.cuda()
    if p.tensor > 1 and p.expert == 1:
        # Experts are never tensor-sharded here (expert-tensor parallel = 1), so with tensor parallel
        # and no expert parallel each tensor rank's expert replica sees only its sequence-parallel slice
        # of the tokens. megatron-core reduces such replicas over the data-parallel group only; marking
        # them sequence-parallel makes `finalize_model_grads` also sum them over the tensor group, and
        # marking them not tensor-parallel counts them once (not once per tensor rank) in the grad norm.
        for name, param in model.named_parameters():
            if ".experts." in name and ".shared_experts." not in name:
                param.sequence_parallel = True
                param.tensor_model_parallel = False
    init_weights(model, m, seed)
    return model


def build_model_chunks(m: ModelConfig, p: ParallelConfig, **kwargs) -> list:
    """This rank's model chunks: one `GPTModel`, or `p.virtual_pipeline` of them (each its own slice of layers, the
    interleaved schedule's virtual stages)."""
    if p.virtual_pipeline == 1:
        return [build_model(m, p, **kwargs)]
    return [build_model(m, p, vp_stage=v, **kwargs) for v in range(p.virtual_pipeline)]


# ---------------------------------------------------------------- initialisation

_LOCAL_EXPERT = re.compile(r"(\.experts\.local_experts\.)(\d+)(\.)")
_GROUPED_EXPERT = re.compile(r"\.experts\.linear_fc(\d)\.weight(\d+)$")
_LAYER = re.compile(r"layers\.(\d+)\.")


def init_name(name: str, *, num_local_experts: int, ep_rank: int, layer_offset: int, tied: bool) -> str:
    """The layout-independent name a parameter's initial values are keyed by.

    Local expert and layer indices become global ones, so every parallel layout names a weight alike; grouped
    experts (`experts.linear_fc2.weight3`, Transformer Engine's grouped GEMM) take the name of the same expert
    in the sequential layout (`experts.local_experts.3.linear_fc2.weight`), so both start from the same
    weights; a tied output layer is the embedding.
    """
    offset = num_local_experts * ep_rank
    name = _LOCAL_EXPERT.sub(lambda x: f"{x.group(1)}{int(x.group(2)) + offset}{x.group(3)}", name)
    name = _GROUPED_EXPERT.sub(
        lambda x: f".experts.local_experts.{int(x.group(2)) + offset}.linear_fc{x.group(1)}.weight", name)
    name = _LAYER.sub(lambda x: f"layers.{int(x.group(1)) + layer_offset}.", name)
    if "output_layer" in name and tied:
        name = "embedding.word_embeddings.weight"
    return name


def init_std(name: str, m: ModelConfig) -> float:
    """Initial standard deviation of the weight called `name` (an `init_name`): megatron-core's scaled std,
    std / sqrt(2 * layers), for the projections that write into the residual stream."""
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return m.init_method_std / (2.0 * m.num_layers) ** 0.5
    return m.init_method_std


def _layer_offset(model) -> int:
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    return layers[0].layer_number - 1 if layers is not None and len(layers) else 0


@torch.no_grad()
def init_weights(model, m: ModelConfig, seed: int) -> None:
    """Initialise every matrix from a generator keyed by (seed, global parameter name).

    Each rank draws the full (unsharded) matrix and keeps its own shard, so the model is the same
    function whatever the tensor, pipeline or expert layout: a parity test compares like with like, and a
    study's seed means the same model on any cluster. Output projections use megatron-core's scaled
    std (std / sqrt(2 * layers)); vectors (norm weights) keep their constructor values.
    """
    from megatron.core import parallel_state as ps

    tp_size = ps.get_tensor_model_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    num_local_experts = m.moe.num_experts // max(ps.get_expert_model_parallel_world_size(), 1)
    layer_offset = _layer_offset(model)
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        gname = init_name(name, num_local_experts=num_local_experts, ep_rank=ep_rank, layer_offset=layer_offset,
                          tied=m.tie_embeddings)
        std = init_std(gname, m)
        # Routed experts are sharded by expert-tensor parallelism only, which is always 1 here
        # (`allreduce` cannot tell: megatron-core sets it True on experts when expert parallel is 1).
        routed_expert = ".experts." in gname and ".shared_experts." not in gname
        shards = tp_size if getattr(param, "tensor_model_parallel", False) and not routed_expert else 1
        dim = getattr(param, "partition_dim", 0)
        stride = getattr(param, "partition_stride", 1)
        full_shape = list(param.shape)
        full_shape[dim] *= shards
        key = int.from_bytes(hashlib.sha256(f"{seed}:{gname}".encode()).digest()[:8], "little")
        gen = torch.Generator().manual_seed(key & 0x7FFF_FFFF_FFFF_FFFF)
        full = torch.empty(full_shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
        if shards > 1:
            chunks = torch.split(full, full_shape[dim] // (shards * stride), dim=dim)
            full = torch.cat(chunks[tp_rank::shards], dim=dim)
        param.copy_(full.to(param.dtype))


# ---------------------------------------------------------------- parameter report

def component_of(name: str) -> str:
    """Which ledger component a megatron-core parameter name belongs to."""
    if "embedding" in name:
        return "embedding"
    if "output_layer" in name:
        return "output_layer"
    # local spec: "...input_layernorm.weight", "decoder.final_layernorm.weight"; Transformer Engine fuses
    # the pre-attention and pre-MLP norms into the next linear: "...linear_qkv.layer_norm_weight"
    if "layernorm" in name or "norm" in name.rsplit(".", 2)[-2] or "norm" in name.rsplit(".", 1)[-1]:
        return "norms"
    if ".router." in name:
        return "router"
    if ".shared_experts." in name:
        return "shared_experts"
    if ".experts." in name:
        return "routed_experts"
    if ".self_attention." in name:
        return "attention"
    if ".mlp." in name:
        return "dense_mlp"
    raise ValueError(f"unclassified parameter {name}")


def local_parameter_counts(model) -> dict[str, int]:
    """Parameters held by this rank, per component (tied output weights are not counted twice)."""
    counts: Counter[str] = Counter({c: 0 for c in COMPONENTS})
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        counts[component_of(name)] += param.numel()
    return dict(counts)
