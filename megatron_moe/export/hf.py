"""A trained run as a Hugging Face checkpoint: dense models as Llama, MoE models as Mixtral, or as Qwen2-MoE when
Mixtral cannot hold them (a shared expert, dense layers between MoE layers, top-k without renormalisation).

The run's newest verified checkpoint is loaded into a single-process model (megatron-core's distributed
checkpoints load into any layout, so a run trained with tensor, pipeline or expert parallelism exports the same
way), its weights are renamed and split into the Hugging Face layout, and `transformers` writes config.json and
safetensors; a tokenizer.json tokenizer goes beside them as a fast tokenizer.

What maps exactly, and why:
- attention: megatron-core's fused QKV holds, per query group, that group's query heads then one key and one
  value head; Hugging Face keeps q, k and v apart with query head h in group h // (heads / groups), the same order.
  RoPE is megatron-core's non-interleaved rotation, which is Llama's `rotate_half`, at `model.rotary_base`.
- SwiGLU: megatron-core's fc1 is [gate; up] (silu on the first half), as Llama's gate_proj and up_proj are and as
  Mixtral's fused gate_up_proj is.
- the router: megatron-core with renormalised top-k (pre-softmax off) takes the top-k logits and a softmax over
  them, which equals Mixtral's softmax over all experts, top-k, then renormalisation (softmax is monotone).
- the vocabulary: the padded embedding rows are exported as they are, so logits match row for row.
- Qwen2-MoE: its router takes the softmax over all experts, then the top-k, renormalised when `norm_topk_prob`
  (= model.moe.topk_renormalize; without it, megatron-core's pre-softmax routing); its shared expert is scaled by
  sigmoid(gate . x), ours has no gate: the gate is exported as zeros (sigmoid(0) = 1/2 exactly) and the shared
  expert's down projection doubled (exact in floating point); layers without MoE are its `mlp_only_layers`; its
  q/k/v biases are off (`qkv_bias = False`).

Anything else has no faithful Hugging Face form here and is refused in one line (`exportable`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from megatron_moe.config import ConfigError, ModelConfig, ParallelConfig, RunConfig
from megatron_moe.train.rundir import newest_checkpoint, run_config


def exportable(m: ModelConfig) -> str | None:
    """Why `m` cannot be exported faithfully (None when it can)."""
    e = m.moe
    if m.normalization != "RMSNorm" or m.activation != "swiglu" or m.position_embedding != "rope":
        return (f"only RMSNorm + SwiGLU + RoPE models map onto Llama, Mixtral and Qwen2-MoE (this one: {m.normalization}, "
                f"{m.activation}, {m.position_embedding})")
    if not m.is_moe:
        return None
    if e.score_function != "softmax":
        return (f"Mixtral and Qwen2-MoE route by softmax (this model: score_function = {e.score_function!r})")
    if e.expert_bias_update_rate > 0:
        return ("the aux-loss-free expert bias changes which experts are chosen; no Hugging Face MoE router has such "
                "a bias")
    if e.capacity_factor:
        return "a capacity factor drops tokens; Mixtral and Qwen2-MoE never do"
    return None


def hf_family(m: ModelConfig) -> str:
    """The Hugging Face class family of an exportable model: llama, mixtral or qwen2_moe."""
    if not m.is_moe:
        return "llama"
    plain = (not m.moe.shared_expert_ffn_hidden_size and all(m.moe_layer_pattern()) and m.moe.topk_renormalize)
    return "mixtral" if plain else "qwen2_moe"


def load_model(cfg: RunConfig, checkpoint: Path) -> Any:
    """`cfg`'s model on this process with `checkpoint`'s weights, in eval mode. Initialises a one-process
    megatron-core job when none is."""
    import torch.distributed as dist

    from megatron_moe.model import build_model
    from megatron_moe.parallel import initialize_parallel
    from megatron_moe.platform import setup_platform
    from megatron_moe.train.checkpoint import load_model_weights

    if not dist.is_initialized():
        initialize_parallel(ParallelConfig(), setup_platform())
    model = build_model(cfg.model, ParallelConfig(), use_te=False)
    load_model_weights(model, checkpoint)
    return model.eval()


def load_trained_model(run_dir: str | Path) -> tuple[RunConfig, Any, Path]:
    """(the run's config, its model with the newest verified checkpoint's weights, that checkpoint)."""
    run_dir = Path(run_dir)
    cfg, checkpoint = run_config(run_dir, repr(str(run_dir))), newest_checkpoint(run_dir, str(run_dir), "to export")
    return cfg, load_model(cfg, checkpoint), checkpoint


def _split_qkv(w: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    head_dim = m.hidden_size // m.num_attention_heads
    per_group = m.num_attention_heads // m.kv_heads
    w = w.view(m.kv_heads, per_group + 2, head_dim, m.hidden_size)
    q, k, v = w[:, :per_group], w[:, per_group], w[:, per_group + 1]
    return (q.reshape(-1, m.hidden_size), k.reshape(-1, m.hidden_size), v.reshape(-1, m.hidden_size))


def hf_state(m: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A megatron-core GPT state dict (one process, local layer spec) renamed and split into the Llama or Mixtral
    layout."""
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
           "model.norm.weight": sd["decoder.final_layernorm.weight"],
           "lm_head.weight": sd["embedding.word_embeddings.weight" if m.tie_embeddings else "output_layer.weight"]}
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = _split_qkv(sd[src + "self_attention.linear_qkv.weight"], m)
        out.update({
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k, dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": sd[src + "self_attention.linear_proj.weight"],
            dst + "input_layernorm.weight": sd[src + "input_layernorm.weight"],
            dst + "post_attention_layernorm.weight": sd[src + "pre_mlp_layernorm.weight"],
        })
        if not m.moe.is_moe_layer(i):
            gate, up = sd[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            out.update({dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
                        dst + "mlp.down_proj.weight": sd[src + "mlp.linear_fc2.weight"]})
            continue
        experts = range(m.moe.num_experts)
        out.update({
            dst + "mlp.gate.weight": sd[src + "mlp.router.weight"],
            dst + "mlp.experts.gate_up_proj": torch.stack(
                [sd[f"{src}mlp.experts.local_experts.{j}.linear_fc1.weight"] for j in experts]),
            dst + "mlp.experts.down_proj": torch.stack(
                [sd[f"{src}mlp.experts.local_experts.{j}.linear_fc2.weight"] for j in experts]),
        })
        if hf_family(m) == "qwen2_moe":
            shared = m.moe.shared_expert_ffn_hidden_size
            fc1 = sd.get(src + "mlp.shared_experts.linear_fc1.weight", torch.zeros(2 * shared, m.hidden_size))
            fc2 = sd.get(src + "mlp.shared_experts.linear_fc2.weight", torch.zeros(m.hidden_size, shared))
            gate, up = fc1.chunk(2, dim=0)
            out.update({dst + "mlp.shared_expert.gate_proj.weight": gate, dst + "mlp.shared_expert.up_proj.weight": up,
                        dst + "mlp.shared_expert.down_proj.weight": 2 * fc2,
                        dst + "mlp.shared_expert_gate.weight": torch.zeros(1, m.hidden_size)})
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def hf_config(m: ModelConfig, vocab_size: int, eos_token_id: int | None) -> Any:
    """The Llama, Mixtral or Qwen2-MoE config of `m` (`vocab_size`: the padded embedding rows)."""
    common = dict(
        vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.kv_heads,
        head_dim=m.hidden_size // m.num_attention_heads, max_position_embeddings=m.seq_length,
        rms_norm_eps=m.norm_epsilon, rope_theta=float(m.rotary_base), tie_word_embeddings=m.tie_embeddings,
        hidden_act="silu", attention_bias=False, attention_dropout=0.0, eos_token_id=eos_token_id,
        bos_token_id=None, torch_dtype="float32",
    )
    if not m.is_moe:
        from transformers import LlamaConfig

        return LlamaConfig(intermediate_size=m.ffn_hidden_size, mlp_bias=False, **common)
    if hf_family(m) == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        del common["head_dim"], common["attention_bias"]
        return Qwen2MoeConfig(intermediate_size=m.ffn_hidden_size, moe_intermediate_size=m.expert_ffn,
                              shared_expert_intermediate_size=m.moe.shared_expert_ffn_hidden_size,
                              num_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
                              norm_topk_prob=m.moe.topk_renormalize, decoder_sparse_step=1,
                              mlp_only_layers=[i for i, moe in enumerate(m.moe_layer_pattern()) if not moe],
                              qkv_bias=False, use_sliding_window=False, output_router_logits=False, **common)
    from transformers import MixtralConfig

    return MixtralConfig(intermediate_size=m.expert_ffn, num_local_experts=m.moe.num_experts,
                         num_experts_per_tok=m.moe.top_k, router_jitter_noise=0.0, output_router_logits=False,
                         **common)


def hf_model(m: ModelConfig, model: Any, eos_token_id: int | None = None) -> Any:
    """A `transformers` model holding `model`'s weights (fp32, eval mode)."""
    from transformers import LlamaForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM

    sd = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    vocab = sd["embedding.word_embeddings.weight"].shape[0]
    config = hf_config(m, vocab, eos_token_id)
    family = {"llama": LlamaForCausalLM, "mixtral": MixtralForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM}
    out = family[hf_family(m)](config)
    missing, unexpected = out.load_state_dict(hf_state(m, sd), strict=False)
    tied = {"lm_head.weight"} if m.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"export layout mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    if m.tie_embeddings:
        out.tie_weights()
    return out.float().eval()


def export_hf(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the run's newest checkpoint to `out_dir` as a Hugging Face model (config.json, safetensors and, for a
    tokenizer.json tokenizer, the tokenizer); atomically: a temporary directory renamed at the end."""
    from megatron_moe.data.source import build_data_source

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError("export hf needs transformers and safetensors: pip install 'megatron-moe[hf]'") from None
    if out_dir.exists():
        raise ConfigError(f"-o {str(out_dir)!r} exists; give a new directory")
    cfg = run_config(run_dir, repr(str(run_dir)))  # every refusal before the heavy imports
    if why := exportable(cfg.model):
        raise ConfigError(f"{run_dir} cannot be exported: {why}")
    model = load_model(cfg, newest_checkpoint(run_dir, str(run_dir), "to export"))
    data = build_data_source(cfg.data, cfg.model.seq_length, cfg.train.global_batch_size)
    out = hf_model(cfg.model, model, data.eod_id)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        out.save_pretrained(tmp)
        tokenizer_file = data.path / data.manifest["tokenizer"]["file"]
        if tokenizer_file.suffix == ".json":
            from transformers import PreTrainedTokenizerFast

            eod = data.manifest["tokenizer"]["eod_token"]
            PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=eod).save_pretrained(tmp)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
