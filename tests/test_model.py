"""Model builder: dense and MoE GPT models build, run forward and backward on CPU, counted per component."""

from __future__ import annotations

import pytest
import torch

from megatron_moe.config import ModelConfig, MoEConfig, ParallelConfig


def small(**moe) -> ModelConfig:
    return ModelConfig(
        vocab_size=1000, seq_length=16, num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, moe=MoEConfig(**moe),
    )


def forward_backward(model, cfg: ModelConfig) -> torch.Tensor:
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    positions = torch.arange(cfg.seq_length).unsqueeze(0).expand(2, -1)
    loss = model(tokens, positions, None, labels=tokens)
    assert loss.shape == (2, cfg.seq_length) and torch.isfinite(loss).all()
    loss.mean().backward()
    return loss


def test_dense_builds_and_counts_per_component(single_process):
    from megatron_moe.model import build_model, local_parameter_counts

    cfg = small()
    model = build_model(cfg, ParallelConfig())
    forward_backward(model, cfg)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    counts = local_parameter_counts(model)
    # vocab 1000 pads to 1024; qkv = 64 x (64 + 2 groups x 2 x 16); SwiGLU fc1 = 64 x 2 x 128.
    assert counts == {
        "embedding": 1024 * 64,
        "attention": 2 * (64 * 128 + 64 * 64),
        "dense_mlp": 2 * (64 * 256 + 128 * 64),
        "routed_experts": 0,
        "shared_experts": 0,
        "router": 0,
        "norms": 5 * 64,
        "output_layer": 1024 * 64,
    }
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())


def test_moe_with_first_dense_layer_and_shared_expert(single_process):
    from megatron_moe.model import build_model, local_parameter_counts

    cfg = small(num_experts=4, top_k=2, expert_ffn_hidden_size=64, shared_expert_ffn_hidden_size=32, first_k_dense=1)
    model = build_model(cfg, ParallelConfig())
    forward_backward(model, cfg)
    counts = local_parameter_counts(model)
    assert counts["dense_mlp"] == 64 * 256 + 128 * 64  # layer 0 only
    assert counts["routed_experts"] == 4 * (64 * 128 + 64 * 64)
    assert counts["shared_experts"] == 64 * 64 + 32 * 64
    assert counts["router"] == 4 * 64
    router = model.decoder.layers[1].mlp.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_the_expert_bias_is_a_buffer_and_leaves_the_counts_unchanged(single_process):
    """Aux-loss-free balancing adds a per-expert bias that no optimizer step trains: the parameter counts, and so
    the planner's ledger and every matched contract, are those of the same model without it."""
    from megatron_moe.model import build_model, local_parameter_counts
    from megatron_moe.planner.ledger import ledger

    plain = small(num_experts=4, top_k=2, expert_ffn_hidden_size=64, score_function="sigmoid")
    biased = small(num_experts=4, top_k=2, expert_ffn_hidden_size=64, score_function="sigmoid",
                   expert_bias_update_rate=1e-3)
    assert ledger(biased, 1) == ledger(plain, 1)
    model = build_model(biased, ParallelConfig())
    routers = [layer.mlp.router for layer in model.decoder.layers]
    assert all(r.expert_bias is not None and r.expert_bias.shape == (4,) for r in routers)
    assert not any(name.endswith("expert_bias") for name, _ in model.named_parameters())
    assert sum(name.endswith("expert_bias") for name in model.state_dict()) == 2  # checkpointed all the same
    assert local_parameter_counts(model) == local_parameter_counts(build_model(plain, ParallelConfig()))
    assert sum(local_parameter_counts(model).values()) == ledger(biased, 1).total_params


def test_tied_embeddings_share_one_matrix(single_process):
    from megatron_moe.model import build_model, local_parameter_counts

    cfg = small()
    cfg.tie_embeddings = True
    model = build_model(cfg, ParallelConfig())
    counts = local_parameter_counts(model)
    assert counts["output_layer"] == 0 and counts["embedding"] == 1024 * 64
    forward_backward(model, cfg)


def test_init_depends_only_on_seed(single_process):
    from megatron_moe.model import build_model

    cfg = small(num_experts=4, top_k=1, topk_renormalize=False)
    a = build_model(cfg, ParallelConfig(), seed=7).state_dict()
    b = build_model(cfg, ParallelConfig(), seed=7).state_dict()
    c = build_model(cfg, ParallelConfig(), seed=8).state_dict()
    key = "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    # Output projections use the depth-scaled std: 0.02 / sqrt(2 x 2 layers) = 0.01.
    proj = a["decoder.layers.1.self_attention.linear_proj.weight"]
    assert 0.008 < proj.std().item() < 0.012


@pytest.mark.parametrize("resize", ["ffn", "ffn+hidden"])
def test_the_arms_of_a_seed_start_from_one_trunk_when_only_the_ffn_is_matched(single_process, resize):
    """Parameters of identical name and shape start from identical values in every arm of a seed: with FFN-only
    matching that is the whole trunk (embeddings, attention, norms, output layer), so a seed's arms differ only
    in the FFN; an arm whose hidden size was resized as well has no parameter in common with the MoE."""
    from megatron_moe.model import build_model
    from megatron_moe.planner.match import match_dense

    moe = small(num_experts=4, top_k=2, expert_ffn_hidden_size=64)
    configs = {"moe": moe, **{c: match_dense(moe, c, resize=resize).config for c in ("active", "total")}}
    states = {arm: dict(build_model(cfg, ParallelConfig(), seed=3).named_parameters()) for arm, cfg in configs.items()}
    trunk = [k for k, v in states["moe"].items() if v.dim() >= 2 and ".mlp." not in k]
    assert {k.split(".")[-2] for k in trunk} >= {"word_embeddings", "linear_qkv", "linear_proj"}
    widened = [arm for arm in ("active", "total") if configs[arm].hidden_size != moe.hidden_size]
    assert widened == ([] if resize == "ffn" else ["active"])
    for arm in ("active", "total"):
        dense = states[arm]
        same = [k for k in trunk if k in dense and dense[k].shape == states["moe"][k].shape]
        assert same == ([] if arm in widened else trunk), arm
        assert all(torch.equal(dense[k], states["moe"][k]) for k in same)


def test_sdpa_core_attention_equals_megatron_local_attention(single_process):
    """The core-attention slot we fill computes what megatron-core's unfused local attention computes."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_moe.model import build_model

    cfg = small()
    model = build_model(cfg, ParallelConfig())
    core = model.decoder.layers[0].self_attention.core_attention
    assert type(core).__name__ == "SDPAttention" and isinstance(core, DotProductAttention)
    s, b, heads, groups, d = cfg.seq_length, 3, cfg.num_attention_heads, cfg.kv_heads, cfg.hidden_size // cfg.num_attention_heads
    torch.manual_seed(0)
    q, k, v = (torch.randn(s, b, n, d, requires_grad=True) for n in (heads, groups, groups))
    ours = core(q, k, v, None, AttnMaskType.causal)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    reference = DotProductAttention.forward(core, q, k, v, None, AttnMaskType.causal)
    ref_grads = torch.autograd.grad(reference.square().sum(), (q, k, v))
    assert ours.shape == reference.shape == (s, b, heads * d)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    # An explicit mask (True = masked out, megatron's convention) gives the same as the causal flag.
    causal = torch.ones(s, s, dtype=torch.bool).triu(1).view(1, 1, s, s)
    torch.testing.assert_close(core(q, k, v, causal, AttnMaskType.padding), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, component", [
    ("decoder.layers.0.input_layernorm.weight", "norms"),
    ("decoder.final_layernorm.weight", "norms"),
    ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", "norms"),  # Transformer Engine's fused norm
    ("decoder.layers.1.mlp.linear_fc1.layer_norm_bias", "norms"),
    ("decoder.layers.0.self_attention.linear_qkv.weight", "attention"),
    ("decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight", "routed_experts"),
    ("decoder.layers.1.mlp.router.weight", "router"),
    ("output_layer.weight", "output_layer"),
])
def test_parameter_components_by_name(name, component):
    from megatron_moe.model import component_of

    assert component_of(name) == component


def test_grouped_and_sequential_experts_share_init_names_and_output_scaling():
    """Grouped-GEMM experts (`experts.linear_fc2.weight3`) draw the same initial weights as the same expert in
    the sequential layout, and their output projection gets the residual-scaled std like every other one."""
    from megatron_moe.model import init_name, init_std

    m = small(num_experts=8, top_k=2)
    keys = dict(num_local_experts=4, ep_rank=1, layer_offset=2, tied=False)
    for fc in (1, 2):
        grouped = init_name(f"decoder.layers.0.mlp.experts.linear_fc{fc}.weight3", **keys)
        sequential = init_name(f"decoder.layers.0.mlp.experts.local_experts.3.linear_fc{fc}.weight", **keys)
        assert grouped == sequential == f"decoder.layers.2.mlp.experts.local_experts.7.linear_fc{fc}.weight"
    scaled = m.init_method_std / (2 * m.num_layers) ** 0.5
    assert init_std(init_name("decoder.layers.0.mlp.experts.linear_fc2.weight3", **keys), m) == scaled
    assert init_std(init_name("decoder.layers.0.mlp.experts.linear_fc1.weight3", **keys), m) == m.init_method_std
    assert init_std(init_name("decoder.layers.0.self_attention.linear_proj.weight", **keys), m) == scaled
    assert init_name("output_layer.weight", **{**keys, "tied": True}) == "embedding.word_embeddings.weight"


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_gpu_fusions_make_a_valid_config(activation):
    """The fused kernels chosen for CUDA without Transformer Engine pass megatron-core's own config checks (a GELU
    model without biases must keep the unfused activation), and CPU gets none."""
    import dataclasses

    from megatron_moe.model import fusions, transformer_config

    m = dataclasses.replace(small(num_experts=4, top_k=2), activation=activation)
    gpu = fusions(m, on_gpu=True, use_te=False)
    assert gpu["bias_activation_fusion"] == (activation == "swiglu") and gpu["bias_dropout_fusion"]
    assert not gpu["apply_rope_fusion"] and not gpu["moe_permute_fusion"]  # Transformer Engine's kernels
    assert not any(fusions(m, on_gpu=False, use_te=False).values())
    tcfg = transformer_config(m, ParallelConfig(), use_te=False)
    assert not tcfg.bias_activation_fusion  # on this CPU machine
    from megatron.core.transformer.transformer_config import TransformerConfig

    kept = {f.name: getattr(tcfg, f.name) for f in dataclasses.fields(TransformerConfig) if f.init}
    TransformerConfig(**{**kept, **gpu})  # raises on a combination megatron-core refuses


def test_every_balancing_method_the_config_allows_is_in_the_one_table():
    import typing

    from megatron_moe.model import BALANCING

    assert set(BALANCING) == set(typing.get_args(typing.get_type_hints(MoEConfig)["aux_loss"]))
    assert len({b.router_type for b in BALANCING.values()}) == len({b.tracked for b in BALANCING.values()}) == 3


def _saved_bytes(model, tokens) -> int:
    """Bytes of the distinct tensors autograd keeps from one forward pass for the backward (parameters aside)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, positions, None, labels=tokens).sum()
    loss.backward()  # recomputed forwards run here, outside the count
    return sum(saved.values())


def test_recomputation_keeps_fewer_activations(single_process):
    # The losses do not change with recomputation (tests/test_parallel.py); what does is what the forward pass keeps:
    # full recomputation keeps each layer's input, selective drops the modules it recomputes.
    from megatron_moe.config import TrainConfig
    from megatron_moe.model import build_model, recompute_options

    m = ModelConfig(vocab_size=256, seq_length=64, num_layers=4, hidden_size=64, num_attention_heads=4,
                    ffn_hidden_size=256, moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=64,
                                                       first_k_dense=2))
    tokens = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    kept = {}
    for name, t in {"none": TrainConfig(), "full": TrainConfig(recompute_granularity="full"),
                    "selective": TrainConfig(recompute_granularity="selective", recompute_modules=["mlp", "moe"])}.items():
        model = build_model(m, ParallelConfig(), use_te=False, recompute=recompute_options(t))
        kept[name] = _saved_bytes(model, tokens)
    assert kept["full"] < 0.5 * kept["none"], kept
    assert kept["selective"] < 0.8 * kept["none"], kept
