"""Dense-to-MoE upcycling (`train.init_from`): an MoE run that starts from a dense run's checkpoint (its newest, or a
named one).

The trunk (embeddings, attention, norms, output layer) is the dense model's; every routed expert of an MoE layer
starts as a copy of that layer's dense FFN, or with granular upcycling (expert width = dense width / g, g dividing
the expert count) as one of its g slices; the router starts fresh (this run's own initialisation). The conversion is
megatron-core's (`transformer/moe/upcycling_utils.py`, after Komatsuzaki et al. 2022 and He et al. 2024); its
weight scaling makes a copy-upcycled MoE with renormalised top-k compute the dense model's function exactly, so its
first forward equals the dense model's (tested).

What megatron-core's conversion needs, checked here in one line each: a dense source with this run's trunk, MoE in
every layer (it takes the first FFN it finds as the template of all), and tensor parallel 1 (it copies a tensor-rank
shard of the dense FFN into experts that are never tensor-split here).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron_moe import directories
from megatron_moe.config import ConfigError, ModelConfig, RunConfig

TRUNK_FIELDS = ("vocab_size", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "normalization",
                "activation", "position_embedding", "rotary_base", "tie_embeddings", "norm_epsilon")
"""ModelConfig fields the dense source and the upcycled MoE must share (the trunk the MoE inherits)."""


def check_upcycling(cfg: RunConfig, source: ModelConfig, where: str) -> None:
    """Refuse (ConfigError, one line, naming the source as `where` says) an upcycling megatron-core cannot do
    faithfully."""
    m = cfg.model
    if source.is_moe:
        raise ConfigError(f"{where} is an MoE run; upcycling starts from a dense run")
    if not m.is_moe:
        raise ConfigError(f"{where}: upcycling makes an MoE from a dense run, and this model is dense (set "
                          "model.moe.num_experts)")
    differ = [f for f in TRUNK_FIELDS if getattr(source, f) != getattr(m, f)]
    if differ:
        f = differ[0]
        raise ConfigError(f"{where} has model.{f} = {getattr(source, f)!r}, this run {getattr(m, f)!r}; the upcycled "
                          "MoE keeps the dense run's trunk")
    if m.moe.first_k_dense or m.moe.every_n != 1:
        raise ConfigError("upcycling (train.init_from) needs MoE in every layer (model.moe.first_k_dense = 0, "
                          "model.moe.every_n = 1): megatron-core's conversion takes one FFN as the template of all")
    if cfg.parallel.tensor != 1:
        raise ConfigError(f"upcycling (train.init_from) needs parallel.tensor = 1, not {cfg.parallel.tensor}: megatron-"
                          "core copies a tensor-parallel shard of the dense FFN into experts that are not tensor-split")
    if cfg.parallel.virtual_pipeline != 1:
        raise ConfigError(f"upcycling (train.init_from) needs parallel.virtual_pipeline = 1, not "
                          f"{cfg.parallel.virtual_pipeline}: start the upcycled run with one chunk per pipeline rank "
                          "and resume it with more (a layout field)")
    if source.ffn_hidden_size % m.expert_ffn or m.moe.num_experts % (source.ffn_hidden_size // m.expert_ffn):
        raise ConfigError(f"model.moe.expert_ffn_hidden_size = {m.expert_ffn} must divide the dense run's "
                          f"ffn_hidden_size = {source.ffn_hidden_size} into g slices, with g dividing model.moe."
                          f"num_experts = {m.moe.num_experts} (g = 1: every expert a copy)")
    if m.moe.shared_expert_ffn_hidden_size:
        raise ConfigError("upcycling (train.init_from) into a model with a shared expert is not offered: megatron-"
                          "core's conversion has no rule for it")


def source_run(cfg: RunConfig) -> tuple[RunConfig, Path]:
    """The dense run `train.init_from` names, as a run directory (its newest verified checkpoint) or as one of its
    checkpoints (`RUN/checkpoints/step_NNNNNNN`): its config and that checkpoint, checked against `cfg`."""
    from megatron_moe.train.checkpoint import verify_checkpoint
    from megatron_moe.train.rundir import newest_checkpoint, run_config

    where = cfg.train.init_from
    named = f"train.init_from = {where!r}"
    path = Path(where)
    one = path.parent.name == directories.CHECKPOINTS
    source = run_config(path.parent.parent if one else path, named, "a run directory nor one of its checkpoints")
    check_upcycling(cfg, source.model, named)
    if not one:
        return source, newest_checkpoint(path, named, "to start from")
    why = "it does not exist (the dense run has not reached that step)" if not path.is_dir() else verify_checkpoint(path)
    if why:
        raise ConfigError(f"{named} cannot be started from: {why}")
    return source, path


def upcycle(model, cfg: RunConfig, source: RunConfig, checkpoint: Path) -> str:
    """Load `checkpoint` of dense run `source` into a dense model on this rank's layout and write its upcycled
    weights into MoE `model` (this rank's, unwrapped); returns what was done, in words."""
    from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

    from megatron_moe.model import build_model
    from megatron_moe.train.checkpoint import load_model_weights

    dense = build_model(source.model, dataclasses.replace(cfg.parallel, expert=1), seed=cfg.train.seed,
                        params_dtype=next(model.parameters()).dtype)
    load_model_weights(dense, checkpoint)
    model.load_state_dict(upcycle_state_dict([model], [dense])["model"])
    g = source.model.ffn_hidden_size // cfg.model.expert_ffn
    how = "a copy of its FFN" if g == 1 else f"one of {g} slices of its FFN (granular upcycling)"
    return (f"upcycled from {checkpoint}: trunk from the dense run, each of the {cfg.model.moe.num_experts} experts "
            f"{how}, router fresh")
