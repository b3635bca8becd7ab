"""Hugging Face export: the exported model gives the megatron-core model's logits on real text, for dense (tied and
untied) and MoE runs (Mixtral, and Qwen2-MoE for a shared expert, dense layers between MoE layers or top-k without
renormalisation), from single-process and tensor/expert-parallel checkpoints; models with no faithful form are
refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_moe.config import MoEConfig, ModelConfig, load_run_config
from megatron_moe.export.hf import exportable
from megatron_moe.schema import save_toml
from tests.conftest import TINY, TINY_MOE, cli

transformers = pytest.importorskip("transformers")

STEPS = ["train.train_steps=6", "train.save_interval=6", "train.eval_interval=6", "data.corpus=tinystories",
         "data.corpus_vocab_size=1000", "model.vocab_size=1000"]
TOLERANCE = 1e-5
"""Largest logit difference allowed (fp32 on CPU). Measured on the dev machine: 0 for the dense models, 1.5e-7
(MoE) and 1.8e-7 (MoE from a TP=2/EP=2 checkpoint): the MoE sums its experts' outputs in another order; 1.5e-7 to
2.4e-7 for Qwen2-MoE forms at initialisation."""


def _logits_both(run_dir, export_dir, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    from megatron_moe.export.hf import load_trained_model

    tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
    ids = torch.tensor([tokenizer(text)["input_ids"][:32]])
    _, model, _ = load_trained_model(run_dir)
    with torch.no_grad():
        ours = model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)(ids).logits
    return ours.float(), theirs.float()


@pytest.mark.slow  # trains a model in a fresh process, as the training tests do
@pytest.mark.parametrize("name, args, nproc", [
    ("dense", [*TINY], 1),
    ("dense_tied", [*TINY, "model.tie_embeddings=true"], 1),
    ("moe", [*TINY_MOE], 1),
    ("moe_tp2_ep2", [*TINY_MOE, "parallel.tensor=2", "parallel.expert=2", "parallel.sequence_parallel=true"], 2),
    ("moe_shared_tp2_ep2", [*TINY_MOE, "model.moe.shared_expert_ffn_hidden_size=64", "model.moe.first_k_dense=1",
                            "model.moe.topk_renormalize=false", "parallel.tensor=2", "parallel.expert=2",
                            "parallel.sequence_parallel=true"], 2),
])
def test_the_export_gives_the_trained_models_logits(single_process, reference_run, tmp_path, name, args, nproc):
    if nproc > 1:
        run_dir = tmp_path / "run"
        cli("train", *args, *STEPS, f"train.output_dir={run_dir}", nproc=nproc)
    else:
        run_dir = reference_run(*args, *STEPS)
    out = tmp_path / "hf"
    proc = cli("export", "hf", str(run_dir), "-o", str(out))
    assert f"wrote {out}" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("qwen2_moe" if "shared" in name else "mixtral" if "moe" in name else "llama")
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".hf.*"))
    ours, theirs = _logits_both(run_dir, out, "Once upon a time, there was a little girl named Lily. She loved")
    assert ours.shape == theirs.shape and ours.shape[-1] == 1024  # the padded vocabulary, row for row
    worst = (ours - theirs).abs().max().item()
    assert worst < TOLERANCE, f"largest logit difference {worst:.2e}"
    assert ours.std().item() > 0.1  # trained logits, not a constant


@pytest.mark.parametrize("moe, why", [
    (dict(score_function="sigmoid"), "score_function = 'sigmoid'"),
    (dict(expert_bias_update_rate=1e-3, score_function="sigmoid"), "score_function = 'sigmoid'"),
    (dict(capacity_factor=1.0), "a capacity factor drops tokens"),
])
def test_a_model_without_a_faithful_form_is_refused(moe, why):
    m = ModelConfig(num_layers=2, moe=MoEConfig(num_experts=4, top_k=2, **moe))
    assert why in exportable(m)
    assert exportable(ModelConfig(num_layers=2, moe=MoEConfig(num_experts=4, top_k=2))) is None
    assert "LayerNorm" in exportable(ModelConfig(normalization="LayerNorm"))


@pytest.mark.parametrize("moe, family", [
    (dict(), "mixtral"),
    (dict(shared_expert_ffn_hidden_size=64), "qwen2_moe"),
    (dict(first_k_dense=1), "qwen2_moe"),
    (dict(every_n=2), "qwen2_moe"),
    (dict(topk_renormalize=False), "qwen2_moe"),
])
def test_each_moe_goes_to_the_class_that_holds_it_and_gives_its_logits(single_process, moe, family):
    from megatron_moe.config import ParallelConfig
    from megatron_moe.export.hf import hf_family, hf_model
    from megatron_moe.model import build_model

    m = ModelConfig(vocab_size=1024, seq_length=32, num_layers=3, hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=128,
                    moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=64, **moe))
    assert exportable(m) is None and hf_family(m) == family
    model = build_model(m, ParallelConfig(), use_te=False).eval()
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(0))
    hf = hf_model(m, model)
    assert type(hf).__name__.lower().startswith(family.replace("_", ""))
    with torch.no_grad():
        ours = model(ids, torch.arange(32).unsqueeze(0).expand(2, -1), None)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() < TOLERANCE and ours.std().item() > 0.1


def test_export_refusals_are_one_line(tmp_path):
    proc = cli("export", "hf", str(tmp_path), "-o", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "is not a run directory" in proc.stderr
    proc = cli("export", "hf", str(tmp_path), "-o", str(tmp_path), check=False)
    assert proc.returncode == 2 and "exists; give a new directory" in proc.stderr
    (tmp_path / "capped").mkdir()
    save_toml(load_run_config(None, [*TINY_MOE, "model.moe.capacity_factor=1.0"]), tmp_path / "capped" / "config.toml")
    proc = cli("export", "hf", str(tmp_path / "capped"), "-o", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"megatron-moe: error: {tmp_path / 'capped'} cannot be exported: a capacity factor drops tokens; Mixtral and "
        "Qwen2-MoE never do")
    (tmp_path / "empty").mkdir()
    save_toml(load_run_config(None, TINY), tmp_path / "empty" / "config.toml")
    proc = cli("export", "hf", str(tmp_path / "empty"), "-o", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "has no checkpoint to export" in proc.stderr.strip().splitlines()[-1]
