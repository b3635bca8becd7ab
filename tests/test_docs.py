"""Every megatron-moe command in the README and in the example headers runs as written.

Dry runs, `plan` and `config show` run in full (in a scratch directory that sees the repository's examples); the
commands that would train, prepare data or write a report are parsed by the real command line and have their
config and overrides loaded, which is everything short of doing the work.
"""

from __future__ import annotations

import re
import shlex

import pytest

from megatron_moe.cli import main, parse
from megatron_moe.config import load_run_config
from megatron_moe.schema import load_toml
from megatron_moe.study.spec import load_study
from tests.conftest import REPO

_PROGRAM = re.compile(r"(?:^|\s)(?:\S*/)?megatron-moe\s+(.*)$|-m megatron_moe\.cli\s+(.*)$")


def _documented() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command: README code blocks and the `#` header lines of the example configs."""
    sources = {"README.md": [], **{str(p.relative_to(REPO)): [] for p in sorted((REPO / "examples").rglob("*.toml"))}}
    readme = (REPO / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        sources["README.md"] += block.splitlines()
    for name in sources:
        if name.endswith(".toml"):
            for line in (REPO / name).read_text().splitlines():
                if not line.startswith("#"):
                    break
                sources[name].append(line[1:])
    out = []
    for where, lines in sources.items():
        text = re.sub(r"\\\n\s*", " ", "\n".join(lines))  # join continuation lines
        for line in text.splitlines():
            for part in line.split("&&"):
                part = re.split(r"\s#\s", part)[0].strip()  # a trailing comment
                match = _PROGRAM.search(part)
                if match:
                    out.append((where, shlex.split(match.group(1) or match.group(2))))
    return out


COMMANDS = _documented()


def test_the_docs_have_commands():
    wheres = {where for where, _ in COMMANDS}
    assert len(COMMANDS) >= 30 and "README.md" in wheres and "examples/equal_resources/7b.toml" in wheres


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[f"{w}:{' '.join(a)[:60]}" for w, a in COMMANDS])
def test_documented_command_runs_as_written(where, argv, tmp_path, monkeypatch, capsys):
    argv = [a.replace("$PWD", str(tmp_path)) for a in argv]
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)
    args = parse(argv)  # a bad flag or argument exits 2 here
    if "--dry-run" in argv or "--help" in argv or argv[0] == "plan" or argv[:2] == ["config", "show"]:
        assert main(argv) == 0, capsys.readouterr().err
        return
    config = getattr(args, "config", None) or getattr(args, "study", None)
    if config and config.endswith(".toml"):
        if "study" in load_toml(config):
            load_study(config, args.overrides, check_world=False)
        else:
            load_run_config(config, args.overrides, world_size=None)
