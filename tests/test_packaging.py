"""The wheel: built from this tree, it holds every module, the built-in corpus with its license, the licenses
and the example configs; installed, it launches a study without the checkout."""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: pip builds in the source tree, and setuptools' build/ keeps files deleted from the source.
    src = tmp_path_factory.mktemp("src") / "megatron-moe"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".whl"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(out), "."], cwd=src, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("megatron_moe-*.whl")
    return path


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "megatron_moe").rglob("*.py")}
    assert modules and modules <= names, sorted(modules - names)  # pyproject lists the packages by hand
    corpus = {f"megatron_moe/data/text/{p.name}" for p in (REPO / "megatron_moe" / "data" / "text").iterdir()}
    assert "megatron_moe/data/text/tinystories.txt.xz" in corpus and corpus <= names
    (dist,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    assert {f"{dist}/licenses/LICENSE", f"{dist}/licenses/megatron_moe/data/text/LICENSE-CDLA-Sharing-1.0.txt"} <= names
    examples = {f"megatron_moe/examples/{p.relative_to(REPO / 'examples').as_posix()}"
                for p in (REPO / "examples").rglob("*.toml")}
    assert "megatron_moe/examples/tiny_three_arm/cpu.toml" in examples and examples <= names
    meta = email.parser.Parser().parsestr(zipfile.ZipFile(wheel).read(f"{dist}/METADATA").decode())
    assert {"tensorboard", "wandb", "dev"} <= set(meta.get_all("Provides-Extra"))
    requires = meta.get_all("Requires-Dist")
    for extra, requirement in (("tensorboard", "tensorboard>=2.15"), ("wandb", "wandb>=0.17")):
        for group in (extra, "dev"):  # CI installs dev: the sink tests run there
            assert any(re.fullmatch(rf"{re.escape(requirement)}\s*;\s*extra\s*==\s*['\"]{group}['\"]", r)
                       for r in requires), (requirement, group, requires)


def test_study_launch_from_the_installed_wheel(wheel, tmp_path):
    """Installed into a site-packages, with the checkout nowhere on the path: the shipped example launches, and
    the job script neither runs in nor imports from site-packages or the checkout."""
    site = tmp_path / "lib" / "site-packages"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the checkout's editable install
    where = subprocess.run([sys.executable, "-c", "import megatron_moe; print(megatron_moe.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where
    # the README's name for the example: not a file here, so the packaged copy
    example = "examples/tiny_three_arm/cpu.toml"
    assert not (work / example).exists() and (site / "megatron_moe" / example).is_file()
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, "-m", "megatron_moe.cli", "study", "launch", example, "--slurm",
                           "--dry-run", "--skip-data-check", "-o", str(out)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scripts = sorted(out.glob("runs/*/slurm.sbatch"))
    assert scripts
    for script in scripts:
        text = script.read_text()
        assert f"\ncd {script.parent} || exit 1\n" in text
        assert "PYTHONPATH=" not in text and str(site) not in text
        assert str(REPO) not in text.replace(sys.executable, "python")
