"""The command line: version, resolved configs, and one spelling of output flags (old ones kept as aliases)."""

from __future__ import annotations

import tomllib

import pytest

from megatron_moe import __version__
from megatron_moe.cli import build_parser, main
from megatron_moe.config import RunConfig, load_run_config
from megatron_moe.schema import from_dict
from tests.conftest import REPO


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"megatron-moe {__version__}"


def test_config_show_prints_the_resolved_config_with_defaults(capsys):
    assert main(["config", "show", str(REPO / "examples/tiny_moe.toml"), "train.lr=0.00123"]) == 0
    shown = tomllib.loads(capsys.readouterr().out)
    expected = load_run_config(REPO / "examples/tiny_moe.toml", ["train.lr=0.00123"])
    assert from_dict(RunConfig, shown) == expected
    assert shown["train"]["lr"] == 0.00123 and "eval_iters" in shown["train"]  # a default the file leaves out
    assert main(["config", "show", str(REPO / "examples/tiny_three_arm/cpu.toml")]) == 0
    assert tomllib.loads(capsys.readouterr().out)["study"]["name"] == "tiny_three_arm_cpu"


def test_config_show_refuses_a_bad_override_in_one_line(capsys):
    assert main(["config", "show", "model.hidden_size=wide"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.hidden_size" in err


@pytest.mark.parametrize("argv, dest", [
    (["data", "prepare", "in.txt", "{flag}", "out"], "output"),
    (["plan", "c.toml", "{flag}", "out"], "write_dir"),
    (["bench", "c.toml", "{flag}", "out"], "out"),
])
def test_output_flag_is_output_dir_everywhere_with_old_spellings_kept(argv, dest):
    old = {"output": "--output", "write_dir": "--write-dir", "out": "--out"}[dest]
    for flag in ("-o", "--output-dir", old):
        args = build_parser().parse_args([a.replace("{flag}", flag) for a in argv])
        assert getattr(args, dest) == "out"


@pytest.mark.parametrize("argv, message", [
    (["train", "train.output_dir="], "train.output_dir is empty"),
    (["train", "train.output_dir={file}"], "is an existing file, not a directory"),
    (["study", "run", str(REPO / "examples/tiny_three_arm/cpu.toml"), "-o", "{file}"], "is an existing file"),
    (["data", "inspect", "--seq-length", "0"], "--seq-length = 0 must be >= 1"),
    (["data", "inspect", "--global-batch-size", "0"], "--global-batch-size = 0 must be >= 1"),
])
def test_bad_output_dirs_and_zero_sizes_are_one_line_errors(tmp_path, capsys, argv, message):
    (tmp_path / "f").write_text("not a directory")
    assert main([a.replace("{file}", str(tmp_path / "f")) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("argv", [
    ["plan", str(REPO / "examples/tiny_moe.toml"), "-o", "{file}"],
    ["study", "report", "{dir}", "-o", "{file}"],
    ["bench", "-o", "{file}"],
])
def test_every_output_dir_flag_refuses_a_file_in_one_line(tmp_path, capsys, argv):
    (tmp_path / "f").write_text("not a directory")
    assert main([a.replace("{file}", str(tmp_path / "f")).replace("{dir}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is an existing file, not a directory" in err


def test_overrides_may_follow_options(capsys):
    import json

    assert main(["plan", str(REPO / "examples/tiny_moe.toml"), "--json", "model.moe.top_k=3"]) == 0
    ledger = json.loads(capsys.readouterr().out)["ledger"]  # 3 of the 4 experts active, not the file's 2
    assert ledger["active"]["routed_experts"] * 4 == ledger["total"]["routed_experts"] * 3
    with pytest.raises(SystemExit) as exc:
        main(["plan", str(REPO / "examples/tiny_moe.toml"), "--json", "--no-such-flag"])
    assert exc.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_config_show_roles_marks_every_field_that_does_not_train(capsys):
    """The marks come from the fields' roles, and the output stays the same TOML config."""
    from megatron_moe.config import field_roles

    assert main(["config", "show", str(REPO / "examples/tiny_moe.toml"), "--roles"]) == 0
    out = capsys.readouterr().out
    assert from_dict(RunConfig, tomllib.loads(out)) == load_run_config(REPO / "examples/tiny_moe.toml")
    section, marked = "", {}
    for line in out.splitlines():
        if line.startswith("["):
            section = line.strip("[]") + "."
        elif " = " in line and "  # " in line:
            marked[section + line.split(" = ")[0]] = line.rsplit("  # ", 1)[1]
    assert marked == {name: role for name, role in field_roles().items() if role != "trains"}
    assert marked["parallel.tensor"] == "layout" and "train.lr" not in marked


def test_launch_help_keeps_acronyms(capsys):
    with pytest.raises(SystemExit):
        main(["study", "launch", "--help"])
    out = capsys.readouterr().out
    assert "GPUs requested per node" in out and "SLURM partition" in out and "USR1 reaches" in out
    assert "container image" in out  # a plain first word is still lowered
    assert not any(bad in out for bad in ("gPUs", "cPUs", "sLURM", "uSR1"))


def test_config_show_describes_every_field(capsys):
    from megatron_moe.config import RunConfig, field_roles
    from megatron_moe.schema import field_docs

    docs = field_docs(RunConfig)
    assert set(docs) == set(field_roles())  # every field of the run config says what it means
    assert docs["model.num_query_groups"] == "Key/value heads for grouped-query attention (0 = num_attention_heads, i.e. MHA)"
    assert main(["config", "show", "--describe", "--roles"]) == 0
    out = capsys.readouterr().out
    assert "\nlr = 0.003  # Peak learning rate\n" in out
    assert "\noutput_dir = " in out and "  # [bookkeeping] " in out
