"""Optional metric sinks: TensorBoard event files and an offline W&B run hold what metrics.jsonl holds, and a
sink turned on without its package is refused at start-up with one line naming the extra."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_moe import directories
from megatron_moe.config import ConfigError, TrainConfig
from megatron_moe.train.monitors import SINK_KEYS, TensorBoardSink, check_sinks, sink_scalars
from tests.conftest import TINY_MOE, cli, metrics_rows

STEPS = 4


@pytest.fixture(scope="module")
def sink_run(tmp_path_factory) -> Path:
    """One tiny MoE run writing metrics.jsonl, TensorBoard events and an offline W&B run."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("sinks")
    cli("train", *TINY_MOE, f"train.train_steps={STEPS}", "train.eval_interval=2", f"train.output_dir={root / 'run'}",
        f"train.tensorboard_dir={root / 'tb'}", "train.wandb_project=sinks", "train.wandb_run_name=study/moe-s1",
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(root / "wb"), "WANDB_SILENT": "true"})
    return root


def _tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _f32(x: float) -> float:
    return float(np.float32(x))  # TensorBoard stores scalars as float32


def test_tensorboard_events_hold_the_metrics_rows(sink_run):
    rows = metrics_rows(sink_run / "run")
    scalars = _tensorboard_scalars(sink_run / "tb")
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for name, value in sink_scalars(row).items():
            expected.setdefault(name, []).append((row["step"], _f32(value)))
    assert scalars == expected
    assert expected["loss/lm"] == [(r["step"], _f32(r["loss"])) for r in train]
    assert expected["eval/val_loss"] == [(r["step"], _f32(r["val_loss"])) for r in evals]
    # what every MoE run logs (MFU only where the GPU's peak is known)
    assert {"loss/lm", "loss/grad_norm", "loss/lr", "perf/tokens_per_s", "perf/tflops_per_device", "moe/lb", "moe/z",
            "moe/load_imbalance", "moe/dropped_fraction", "eval/val_loss", "eval/val_bpb"} <= set(scalars)
    # and per MoE layer (TINY_MOE: 2 layers of 4 experts), the load each expert took and the imbalance
    per_layer = {f"moe/layer{i}/{x}" for i in (1, 2) for x in ("load_imbalance", *(f"expert{j}_load" for j in range(4)))}
    assert per_layer <= set(scalars) <= set(SINK_KEYS.values()) | per_layer
    last = train[-1]
    assert scalars["moe/layer2/expert3_load"][-1] == (4, _f32(last["expert_load"][1][3]))


def _wandb_records(path: Path) -> list:
    """The records of a .wandb file: W&B's LevelDB-style log (7-byte file header, 32 KiB blocks, each record
    a 7-byte header (crc32, length, type) and its bytes, records cut across blocks as first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break  # zero padding at the end of what was written
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _items(items) -> dict[str, float]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_wandb_offline_run_holds_the_metrics_rows_and_the_final_loss(sink_run):
    rows = metrics_rows(sink_run / "run")
    (run_file,) = (sink_run / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    run_id = (sink_run / "run" / "wandb-run-id").read_text().strip()
    assert run_file.name == f"run-{run_id}.wandb"  # a resumed attempt continues this W&B run
    records = _wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "study/moe-s1" and run.project == "sinks"
    history: dict[int, dict[str, float]] = {}
    summary: dict[str, float] = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = _items(r.history.item)
            history.setdefault(int(items["_step"]), {}).update(items)
        elif kind == "summary":
            summary.update(_items(r.summary.update))
    for row in rows:
        logged = history[row["step"]]
        for key, value in sink_scalars(row).items():
            assert logged[key] == pytest.approx(value, rel=1e-12), (row["step"], key)
    final = [r for r in rows if r["kind"] == "train"][-1]
    assert final["step"] == STEPS
    assert summary["loss/lm"] == pytest.approx(final["loss"], rel=1e-12)
    assert summary["eval/val_loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-12)
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # finished, not left running


def test_tensorboard_hides_the_steps_a_resumed_run_redoes(tmp_path):
    """A resumed attempt logs again the steps after its checkpoint: TensorBoard shows that attempt's values."""
    pytest.importorskip("tensorboard")
    first = TensorBoardSink(tmp_path, resumed_step=None)
    for step in (1, 2, 3, 4):
        first.log(step, {"loss/lm": float(step)})
    first.close()
    resumed = TensorBoardSink(tmp_path, resumed_step=2)
    for step in (3, 4, 5):
        resumed.log(step, {"loss/lm": 10.0 * step})
    resumed.close()
    assert _tensorboard_scalars(tmp_path)["loss/lm"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    fresh = TensorBoardSink(tmp_path, resumed_step=None)  # starting over hides every earlier step
    fresh.log(1, {"loss/lm": 7.0})
    fresh.close()
    assert _tensorboard_scalars(tmp_path)["loss/lm"] == [(1, 7.0)]


@pytest.mark.parametrize("field, package", [("tensorboard_dir", "tensorboard"), ("wandb_project", "wandb")])
def test_a_sink_without_its_package_is_a_config_error(monkeypatch, field, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import <package>` fail
    with pytest.raises(ConfigError) as err:
        check_sinks(TrainConfig(**{field: "x"}))
    message = str(err.value)
    assert "\n" not in message and f"train.{field} = 'x'" in message
    assert f"pip install 'megatron-moe[{package}]'" in message
    check_sinks(TrainConfig())  # sinks off: nothing is imported


def test_missing_sink_package_stops_training_at_start_up_with_one_line(tmp_path):
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None  # as if not installed\n")
    out = tmp_path / "run"
    proc = cli("train", *TINY_MOE, "train.train_steps=2", f"train.output_dir={out}", "train.wandb_project=p",
               check=False, env={"PYTHONPATH": str(blocker)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "megatron-moe: error: train.wandb_project = 'p' needs the wandb package; install it with "
        "pip install 'megatron-moe[wandb]' (or set train.wandb_project = \"\" to turn it off)")
    assert not (out / directories.METRICS).exists()
