"""The preemption marker: what a runner reads to tell "stopped by a signal, checkpoint saved" from a failure."""

from __future__ import annotations

import json
import signal

from megatron_moe.train.stop import PREEMPTED_MARKER, clear_preempted, mark_preempted, was_preempted


def test_preemption_marker_is_written_read_and_cleared(tmp_path):
    assert not was_preempted(tmp_path)
    mark_preempted(tmp_path, 12, signal.SIGUSR1)
    assert was_preempted(tmp_path)
    assert json.loads((tmp_path / PREEMPTED_MARKER).read_text()) == {"step": 12, "signal": "SIGUSR1"}
    mark_preempted(tmp_path, 20, signal.SIGTERM)  # a later stop replaces it
    assert json.loads((tmp_path / PREEMPTED_MARKER).read_text()) == {"step": 20, "signal": "SIGTERM"}
    clear_preempted(tmp_path)
    assert not was_preempted(tmp_path) and not (tmp_path / PREEMPTED_MARKER).exists()
    clear_preempted(tmp_path)  # nothing to clear
    clear_preempted(tmp_path / "not-created-yet")  # start-up before the output directory exists


def test_unreadable_marker_is_not_a_preemption(tmp_path):
    (tmp_path / PREEMPTED_MARKER).write_text('{"step": 3')
    assert not was_preempted(tmp_path)
    (tmp_path / PREEMPTED_MARKER).write_text("[]")
    assert not was_preempted(tmp_path)
