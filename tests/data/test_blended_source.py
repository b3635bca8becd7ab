"""A blended source of two real prepared datasets, checked sample by sample against its parts, and its refusals
(apart from tests/data/test_blend.py: preparing datasets takes seconds, which mutmut would pay for every change it
makes to the data schedule)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from megatron_moe.config import ConfigError, DataConfig
from megatron_moe.data.blend import PERIOD
from megatron_moe.data.prepare import prepare_dataset
from megatron_moe.data.source import DataSource, build_data_source
from megatron_moe.data.tokenizers import EOD_TEXT


def _prepare(root: Path, name: str, docs: list[str], tokenizer: Path | None = None) -> Path:
    (root / f"{name}.txt").write_text("".join(f"{d}\n{EOD_TEXT}\n" for d in docs), encoding="utf-8")
    prepare_dataset([root / f"{name}.txt"], root / name, tokenizer=tokenizer, vocab_size=300, valid_fraction=0.2,
                    progress=False)
    return root / name


def prepare_two(root: Path) -> tuple[Path, Path]:
    """Two prepared datasets of different texts (and bytes per token) with one tokenizer."""
    a = _prepare(root, "a", [f"The cat sat on mat number {i} and purred {i % 5} times." for i in range(300)])
    b = _prepare(root, "b", [f"Zebra {i}: xylophones quietly jingle; {i * 7} quick foxes vex." for i in range(300)],
                 tokenizer=a / "tokenizer.json")
    return a, b


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> tuple[Path, Path]:
    return prepare_two(tmp_path_factory.mktemp("blend"))


def test_a_blended_source_is_its_parts_interleaved_sample_by_sample(two):
    a, b = two
    cfg = DataConfig(blend=[str(a), str(b)], blend_weights=[3.0, 1.0], epochs=2.0)
    ds = build_data_source(cfg, 16, 4)
    parts = [DataSource(p, dataclasses.replace(cfg, path=str(p), blend=[], blend_weights=[]), 16, 4) for p in two]
    share = [0.75, 0.25]
    # Training: sample j is sample k of the part the pattern names, k counted in that part alone.
    got = np.concatenate([ds.train_batch(s) for s in range(ds.num_steps)])
    seen = [0, 0]
    for j, row in enumerate(got):
        i = int(ds.pattern.dataset[j % PERIOD])
        assert np.array_equal(row, parts[i].samples(seen[i], 1)[0]), j
        seen[i] += 1
    # The blend ends when the first part's 2 epochs run out, to within a batch.
    assert min(parts[i].schedule.num_samples - seen[i] for i in range(2)) < 4
    # Validation: the parts' held-out samples in the same proportions; bits per byte over those shares.
    valid = np.concatenate(ds.valid_batches(4, 0))
    seen = [0, 0]
    for j, row in enumerate(valid):
        i = int(ds.pattern.dataset[j])
        assert np.array_equal(row, parts[i].valid_samples(seen[i], 1)[0])
        seen[i] += 1
    assert parts[0].bytes_per_token != parts[1].bytes_per_token
    assert ds.bytes_per_token == pytest.approx(share[0] * parts[0].bytes_per_token + share[1] * parts[1].bytes_per_token)
    equal = build_data_source(dataclasses.replace(cfg, blend_weights=[]), 16, 4)
    assert equal.weights == [0.5, 0.5] and equal.pattern.dataset[:4].tolist() == [0, 1, 0, 1]  # no weights: equal
    info = ds.describe(train_steps=3)
    assert [p["consumed_tokens"] for p in info["blend"]] == [9 * 16, 3 * 16]
    assert info["unique_tokens"] == sum(p.schedule.unique_tokens for p in parts)
    assert info["consumed_tokens"] == 3 * 4 * 16


def test_the_budget_is_split_by_weight_and_the_fingerprint_covers_the_blend(two):
    a, b = two
    base = DataConfig(blend=[str(a), str(b)], blend_weights=[3.0, 1.0], unique_tokens=1200, epochs=1.0)
    ds = build_data_source(base, 16, 4)
    assert [p.cfg.unique_tokens for p in ds.parts] == [900, 300]
    assert all(p.schedule.unique_tokens <= p.cfg.unique_tokens for p in ds.parts)
    others = [dataclasses.replace(base, blend_weights=[1.0, 1.0]), dataclasses.replace(base, blend=[str(b), str(a)]),
              dataclasses.replace(base, seed=base.seed + 1), dataclasses.replace(base, unique_tokens=1000)]
    prints = {ds.fingerprint()} | {build_data_source(c, 16, 4).fingerprint() for c in others}
    assert len(prints) == 1 + len(others)
    assert build_data_source(base, 16, 4).fingerprint() == ds.fingerprint()


def test_bad_blends_are_one_line_errors(two, tmp_path):
    a, b = two
    other = _prepare(tmp_path, "c", [f"Another vocabulary entirely, story {i}." for i in range(40)])
    cases = [
        (DataConfig(blend=[str(a), str(other)]), "has another tokenizer than"),
        (DataConfig(blend=[str(a), str(tmp_path / "nope")]), "data.blend[1] = "),
        (DataConfig(blend=[str(a)]), "names one dataset; give data.path"),
        (DataConfig(blend=[str(a), str(b)], path=str(a)), "data.blend and data.path"),
        (DataConfig(blend=[str(a), str(b)], blend_weights=[1.0]), "has 1 weights for 2 datasets"),
        (DataConfig(blend=[str(a), str(b)], blend_weights=[1.0, 0.0]), "every weight must be > 0"),
    ]
    for cfg, message in cases:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as err:
            build_data_source(cfg, 16, 4)
        assert "\n" not in str(err.value)

