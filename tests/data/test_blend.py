"""Weighted data blends: the interleave (by hand and by its prefix property) and a blended source of two real
prepared datasets, checked sample by sample against its parts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from megatron_moe.config import ConfigError, DataConfig
from megatron_moe.data.blend import PERIOD, BlendPattern, slot_counts
from megatron_moe.data.prepare import prepare_dataset
from megatron_moe.data.source import DataSource, build_data_source
from megatron_moe.data.tokenizers import EOD_TEXT


def test_the_interleave_of_a_small_period_by_hand():
    # Slots of dataset 0 at (2k+1)/14, of dataset 1 at (2k+1)/6; the tie at 1/2 goes to dataset 0.
    p = BlendPattern([0.7, 0.3], period=10)
    assert p.counts.tolist() == [7, 3]
    assert p.dataset.tolist() == [0, 1, 0, 0, 0, 1, 0, 0, 1, 0]
    ds, index = p.origin(np.arange(12))
    assert ds.tolist() == [0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert index.tolist() == [0, 0, 1, 2, 3, 1, 4, 5, 2, 6, 7, 3]
    assert p.position(1, 3) == 11 and p.position(0, 7) == 10
    # Dataset 1 holds 2 samples: the blend ends before its third (blended sample 8).
    assert p.length([100, 2]) == 8 and p.taken(8).tolist() == [6, 2]


def test_weights_round_to_whole_slots_by_largest_remainder():
    assert slot_counts([1, 1, 1], period=10).tolist() == [4, 3, 3]
    assert slot_counts([1, 2], period=10).tolist() == [3, 7]  # remainders 1/3 and 2/3: the larger gets the slot
    assert slot_counts([2.0, 1.0], period=PERIOD).tolist() == [43691, 21845]
    with pytest.raises(ConfigError) as err:
        slot_counts([1.0, 1e-6])
    assert str(err.value) == ("data.blend_weights = [1.0, 1e-06]: weight 1e-06 is below 1/65536 of the total, too "
                              "small to give its dataset a sample")


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0, 3.0], [0.123, 0.877]])
def test_every_prefix_holds_each_share_to_one_sample_and_reads_each_dataset_in_order(weights):
    p = BlendPattern(weights)
    n = 3 * PERIOD + 77
    ds, index = p.origin(np.arange(n))
    share = p.counts / PERIOD
    counts = np.zeros(len(weights), np.int64)
    for j in range(0, n, 997):  # prefixes
        counts = np.bincount(ds[:j], minlength=len(weights))
        assert np.all(np.abs(counts - share * j) <= 1.0), (j, counts, share * j)
        assert p.taken(j).tolist() == counts.tolist()
    for i in range(len(weights)):  # each dataset's samples in order, none skipped or read twice
        mine = index[ds == i]
        assert mine.tolist() == list(range(len(mine)))
        assert all(p.position(i, int(k)) == j for k, j in zip(mine[::1009], np.flatnonzero(ds == i)[::1009]))
    assert abs(share - np.asarray(weights) / sum(weights)).max() <= 1 / PERIOD


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

