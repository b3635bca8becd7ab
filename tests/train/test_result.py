"""result.json: written and read through one typed record, strict about shape and layout version."""

from __future__ import annotations

import json

import pytest

from megatron_moe import directories
from megatron_moe.schema import ConfigError
from megatron_moe.train.result import RUN_RESULT_VERSION, RunResult, read_result, write_result

RESULT = RunResult(steps=4, final_train_loss=2.5, best_val_loss=2.25, best_val_step=4, train_time_s=1.5,
                   tokens_per_step=64, data={"fingerprint": "f00d"})


def test_a_result_reads_back_as_written(tmp_path):
    assert read_result(tmp_path) is None  # not finished
    write_result(tmp_path, RESULT)
    assert read_result(tmp_path) == RESULT
    assert json.loads((tmp_path / directories.RESULT).read_text())["version"] == RUN_RESULT_VERSION


def test_a_version_0_result_without_the_version_key_is_read(tmp_path):
    raw = {k: v for k, v in json.loads(json.dumps(RESULT.__dict__)).items() if k not in ("version",)}
    (tmp_path / directories.RESULT).write_text(json.dumps(raw))
    assert read_result(tmp_path) == RESULT


@pytest.mark.parametrize("text, message", [
    ("{", "is not a readable result.json (Expecting"),
    ("[]", "is not a valid result.json: expected a JSON object, found list"),
    ('{"steps": 4}', "is not a valid result.json: no 'final_train_loss'"),
    ('{"steps": "4"}', "is not a valid result.json: steps = '4' has the wrong type; expected int"),
    ('{"version": 7}', f"has layout version 7; this megatron-moe reads versions up to {RUN_RESULT_VERSION}"),
])
def test_a_bad_result_is_refused_in_one_line(tmp_path, text, message):
    (tmp_path / directories.RESULT).write_text(text)
    with pytest.raises(ConfigError) as exc:
        read_result(tmp_path)
    assert message in str(exc.value) and str(tmp_path / directories.RESULT) in str(exc.value)
    assert "\n" not in str(exc.value)
