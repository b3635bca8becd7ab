"""The data check of a planned study: each run's data source built once per distinct data config (no training) and
described, so that a schedule too short for an arm's steps, a dataset too small for the budget or arms of one seed
that would see different data are refused before any compute is spent."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from megatron_moe.config import ConfigError
from megatron_moe.study.design import Design


def absent_data_path(design: Design) -> str | None:
    """A dataset (`data.path`, `data.blend`) of the design's runs that does not exist on this machine (None when every
    one does): a dry run plans without the data, so that a study can be designed before its corpus is prepared or
    copied here."""
    return next((path for r in design.runs for path in r.config.data.datasets() if not Path(path).exists()), None)


def dry_run_note(path: str) -> str:
    return (f"note: the dataset {path!r} does not exist here; this dry run plans without checking the data "
            "(a real run refuses)")


def data_check(design: Design) -> dict[str, dict[str, dict[str, Any]]]:
    """Build each run's data source once per distinct data config (no training) and describe it: catches a
    schedule too short for an arm's steps, or a dataset too small for the budget, before any compute is spent.
    Keyed by seed (as a string, as in study.json), then arm."""
    from megatron_moe.data.source import build_data_source

    out: dict[str, dict[str, dict[str, Any]]] = {}
    cache: dict[str, Any] = {}
    for run in design.runs:
        c = run.config
        key = json.dumps([dataclasses.asdict(c.data), c.model.seq_length, c.train.global_batch_size])
        if key not in cache:
            cache[key] = build_data_source(c.data, c.model.seq_length, c.train.global_batch_size)
        ds = cache[key]
        steps = c.train.train_steps + c.data.start_batch  # an upcycled arm's stream includes its dense run's steps
        if ds.num_steps is not None and steps > ds.num_steps:
            raise ConfigError(
                f"arm {run.arm}: {steps} steps exceed the {ds.num_steps} steps the data schedule provides "
                f"(data.seed = {c.data.seed})"
            )
        if ds.vocab_size > c.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {c.model.vocab_size} is smaller than the tokenizer's vocabulary ({ds.vocab_size})"
            )
        d = ds.describe(steps)
        note = ds.repeats(steps)
        out.setdefault(str(run.seed), {})[run.arm] = {
            **{k: d[k] for k in ("source", "unique_tokens", "consumed_tokens", "epochs", "fingerprint")},
            "data_seed": c.data.seed,
            **({"note": f"arm {run.arm}: {note.removeprefix('note: ')}"} if note else {}),
        }
    return out


def unequal_data(data: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The seeds whose arms would not see the same data: {seed: {arm: fingerprint}} ({} when fair)."""
    out = {}
    for seed, arms in data.items():
        prints = {arm: d.get("fingerprint") for arm, d in arms.items()}
        if len(set(prints.values())) != 1 or not all(prints.values()):
            out[seed] = prints
    return out


def refuse_unequal_data(data: dict[str, dict[str, dict[str, Any]]]) -> None:
    """ConfigError when the arms of one seed would see different data. The planner gives every arm of a seed
    the same data config, so this cannot happen by construction; it is checked so that an unfair study is
    refused rather than trained."""
    bad = unequal_data(data)
    if bad:
        where = "; ".join(f"seed {seed}: " + ", ".join(f"{arm} {fp}" for arm, fp in prints.items())
                          for seed, prints in bad.items())
        raise ConfigError(f"arms of one seed would see different data (fingerprints {where}); every arm of a seed "
                          "needs the same data config")
