"""Run-directory state: what squeue's answers mean for a submitted run."""

from __future__ import annotations

import os

import pytest

from megatron_moe.study.studydir import LaunchError, job_state


def _fake_squeue(tmp_path, monkeypatch, stdout: str, stderr: str, code: int) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "squeue"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{stdout}'\nprintf '%s\\n' '{stderr}' >&2\nexit {code}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_a_queued_job_reports_its_state(tmp_path, monkeypatch):
    _fake_squeue(tmp_path, monkeypatch, "PENDING\n", "", 0)
    assert job_state("12") == "PENDING"


def test_a_job_slurm_has_forgotten_is_not_queued(tmp_path, monkeypatch):
    _fake_squeue(tmp_path, monkeypatch, "", "slurm_load_jobs error: Invalid job id specified", 1)
    assert job_state("12") is None


def test_a_failing_squeue_is_an_error_not_a_finished_job(tmp_path, monkeypatch):
    _fake_squeue(tmp_path, monkeypatch, "", "slurm_load_jobs error: Unable to contact slurm controller", 1)
    with pytest.raises(LaunchError, match="Unable to contact slurm controller"):
        job_state("12")
