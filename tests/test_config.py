"""Config loading: strict keys, types, dotted-path errors, parallel arithmetic; bad input via the CLI."""

from __future__ import annotations

import pytest

from megatron_moe.config import ConfigError, RunConfig, load_run_config, validate
from megatron_moe.schema import apply_overrides, from_dict, save_toml, to_toml
from tests.conftest import cli


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = RunConfig()
    validate(cfg, world_size=1)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg.to_dict()))
    assert load_run_config(path).to_dict() == cfg.to_dict()


def test_overrides_parse_toml_values_and_bare_strings():
    data = apply_overrides({}, ["model.moe.num_experts=8", "train.lr=1e-3", "train.precision=fp32", "model.tie_embeddings=true"])
    cfg = from_dict(RunConfig, data)
    assert cfg.model.moe.num_experts == 8 and cfg.train.lr == 1e-3
    assert cfg.train.precision == "fp32" and cfg.model.tie_embeddings is True


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"hiden_size": 3}}, "unknown key 'model.hiden_size'"),
        ({"model": {"hidden_size": "big"}}, "model.hidden_size = 'big' has the wrong type; expected int"),
        ({"model": {"moe": {"top_k": 1.5}}}, "model.moe.top_k = 1.5 has the wrong type"),
        ({"train": {"precision": "fp16"}}, "train.precision = 'fp16' is not allowed; expected one of 'auto'"),
        ({"model": "x"}, "model must be a table"),
        ({"train": {"lr": float("nan")}}, "train.lr = nan is not allowed; expected a finite number"),
        ({"data": {"epochs": float("inf")}}, "data.epochs = inf is not allowed; expected a finite number"),
    ],
)
def test_strict_loading_names_the_dotted_path(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        from_dict(RunConfig, data)


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.tensor=3"], 3, "model.num_attention_heads = 4 is not divisible by parallel.tensor = 3"),
        (["model.moe.num_experts=4", "parallel.expert=3"], 3, "model.moe.num_experts = 4 is not divisible by parallel.expert = 3"),
        (["model.moe.num_experts=4", "model.moe.top_k=5"], 1, "model.moe.top_k = 5 exceeds model.moe.num_experts = 4"),
        (["parallel.tensor=2"], 3, "world size 3 is not divisible by parallel.tensor x parallel.pipeline = 2 x 1 = 2"),
        (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, "train.global_batch_size = 6 is not divisible"),
        (["parallel.expert=2"], 2, "parallel.expert = 2 needs an MoE model"),
        (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel = true needs parallel.tensor > 1"),
        (["model.num_query_groups=-2"], 1, "model.num_query_groups = -2 must be >= 0"),
        (["model.hidden_size=12", "model.num_attention_heads=4"], 1, "= 3 is odd; rotary position embeddings need"),
        (["train.adam_beta1=1.0"], 1, "train.adam_beta1 = 1.0 must be in [0, 1)"),
        (["train.adam_eps=0"], 1, "train.adam_eps = 0.0 must be > 0"),
        (["model.norm_epsilon=0"], 1, "model.norm_epsilon = 0.0 must be > 0"),
        (["data.synthetic_documents=20"], 1, "data.synthetic_documents = 20 must be >= 21"),
        (["model.moe.num_experts=4", "model.moe.score_function='sigmoid'", "model.moe.topk_renormalize=false"], 1,
         "model.moe.topk_renormalize = false has no effect with model.moe.score_function = 'sigmoid'"),
        (["model.moe.num_experts=4", "model.moe.expert_bias_update_rate=1e-3"], 1,
         "model.moe.expert_bias_update_rate = 0.001 (aux-loss-free balancing) needs model.moe.score_function = "
         "'sigmoid', not 'softmax'"),
        (["model.moe.num_experts=4", "model.moe.aux_loss='sequence'", "model.moe.aux_loss_coeff=0"], 1,
         "model.moe.aux_loss = 'sequence' has no effect with model.moe.aux_loss_coeff = 0"),
        (["model.moe.num_experts=4", "model.moe.expert_bias_update_rate=-1e-3"], 1,
         "model.moe.expert_bias_update_rate = -0.001 must be >= 0"),
        (["model.moe.aux_loss='batch'"], 1,
         "model.moe.aux_loss = 'batch' is not allowed; expected one of 'micro_batch', 'sequence', 'global_batch'"),
        (["train.recompute_granularity='full'", "train.recompute_num_layers=3", "model.num_layers=4",
          "parallel.pipeline=2"], 2, "train.recompute_num_layers = 3 must be in [1, 2] (the layers of one pipeline"),
        (["train.recompute_granularity='selective'", "train.recompute_modules=['attn']"], 1,
         "train.recompute_modules = ['attn'] must name some of core_attn, layernorm, mlp, moe, shared_experts"),
        (["train.recompute_granularity='selective'", "train.recompute_modules=['moe_act']",
          "model.moe.num_experts=4"], 1, "train.recompute_modules 'moe_act' needs model.moe.grouped_gemm = true"),
        (["train.recompute_granularity='some'"], 1, "train.recompute_granularity = 'some' is not allowed"),
        (["train.overlap_param_gather=true"], 1, "train.overlap_param_gather = true needs train.distributed_optimizer"),
        (["parallel.context=2"], 2, "parallel.context = 2: context parallelism is not offered (it needs Transformer "
                                    "Engine's attention"),
        (["parallel.virtual_pipeline=2"], 1, "parallel.virtual_pipeline = 2 needs parallel.pipeline > 1"),
        (["parallel.tensor=2", "model.moe.num_experts=4"], 2,
         "parallel.tensor = 2 with an MoE model needs parallel.sequence_parallel = true"),
        (["parallel.virtual_pipeline=2", "parallel.pipeline=2", "model.num_layers=6"], 2,
         "model.num_layers = 6 is not divisible by parallel.pipeline x parallel.virtual_pipeline = 2 x 2"),
        (["parallel.virtual_pipeline=2", "parallel.pipeline=2", "model.num_layers=4", "train.global_batch_size=2",
          "train.micro_batch_size=2"], 2, "parallel.virtual_pipeline = 2 needs at least parallel.pipeline = 2 "
                                          "micro-batches per step"),
        (["parallel.virtual_pipeline=0"], 1, "parallel.virtual_pipeline = 0 must be"),
    ],
)
def test_validation_spells_out_the_arithmetic(overrides, world, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(None, overrides, world_size=world)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "toml, expected",
    [
        ("[model]\nnum_layerz = 2\n", "unknown key 'model.num_layerz'"),
        ("[model]\nhidden_size = 'wide'\n", "model.hidden_size = 'wide' has the wrong type"),
        ("[model]\nnum_attention_heads = 6\nhidden_size = 96\n[parallel]\ntensor = 4\n", "not divisible by parallel.tensor = 4"),
        ("[model.moe]\nnum_experts = 6\n[parallel]\nexpert = 4\n", "model.moe.num_experts = 6 is not divisible by parallel.expert = 4"),
        ("[model.moe]\nnum_experts = 2\ntop_k = 3\n", "model.moe.top_k = 3 exceeds model.moe.num_experts = 2"),
        ("[model\n", "not valid TOML"),
    ],
)
def test_bad_config_via_cli_is_one_line_and_nonzero(tmp_path, toml, expected):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    proc = cli("train", str(path), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("megatron-moe: error:") and expected in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    "value", ["runs/\U0001F600", 'quote " back \\ slash', "tab\tnew\nline\r", "del\x7f", "ctl\x01\x1f", "\u00e9\u4e2d\u2028"]
)
def test_saved_toml_reads_back_any_string(tmp_path, value):
    cfg = load_run_config(None, [])
    cfg.train.output_dir = value
    save_toml(cfg, tmp_path / "run.toml")
    assert load_run_config(str(tmp_path / "run.toml"), []).train.output_dir == value


@pytest.mark.parametrize("given, message", [
    ("missing.toml", "config file 'missing.toml' does not exist"),
    ("examples", "config file 'examples' is a directory; give a TOML file"),
    ("/dev/zero", "config file '/dev/zero' is not a regular file; give a TOML file"),
])
def test_a_config_that_is_not_a_toml_file_is_one_line(given, message, capsys, monkeypatch):
    from megatron_moe.cli import main
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    assert main(["config", "show", given]) == 2
    assert capsys.readouterr().err.strip() == f"megatron-moe: error: {message}"


def test_every_field_has_a_role_and_resume_may_change_exactly_the_resumable_ones():
    """Roles are declared on the fields; the resume check derives from them: a changed field is refused on resume
    unless its role is schedule, layout or bookkeeping."""
    from megatron_moe.config import RESUMABLE_ROLES, ROLES, field_roles
    from megatron_moe.train.rundir import _flatten, config_changes
    from tests.conftest import with_other_value

    roles = field_roles()
    assert set(roles.values()) <= set(ROLES) and len(roles) > 60
    assert {k for k, r in roles.items() if r == "layout"} == {
        *(f"parallel.{n}" for n in ("tensor", "pipeline", "expert", "sequence_parallel", "context",
                                    "virtual_pipeline")),
        *(f"train.recompute_{n}" for n in ("granularity", "modules", "num_layers")),
        "train.overlap_grad_reduce", "train.overlap_param_gather"}
    assert roles["train.eval_interval"] == "schedule" and roles["train.eval_iters"] == "measures"
    cfg = RunConfig()
    recorded = _flatten(cfg.to_dict())
    for name, role in roles.items():
        refused = config_changes(recorded, with_other_value(cfg, name))
        assert refused == ({} if role in RESUMABLE_ROLES else {name: (recorded[name], refused[name][1])}), name
