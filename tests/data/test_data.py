"""Data layer: preprocessing round trip, splits, data-reuse schedules, fingerprints, bad input via the CLI."""

from __future__ import annotations

import errno
import gzip
import os
import json
import math
import lzma
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_moe.config import ConfigError, DataConfig, RunConfig
from megatron_moe.schema import from_dict
from megatron_moe.data.prepare import prepare_dataset
from megatron_moe.data.schedule import Schedule
from megatron_moe.data.source import MAX_UNASKED_EPOCHS, DataSource, build_data_source
from megatron_moe.data.store import TokenStore, read_manifest
from megatron_moe.data.corpora import synthetic_dataset
from megatron_moe.data.tokenizers import EOD_TEXT, load_tokenizer
from tests.conftest import MODULE, REPO, SHARED_DATA, cli


DOCS = [
    "Once upon a time, there was a cat named Tom.\nTom liked milk.",
    "Lily saw a “shiny” star — and smiled. ☺",
    "A story\n\nwith two paragraphs.",
    "Short.",
    "Numbers 1234 and symbols <>&% are fine; tabs\ttoo.",
] + [f"Document number {i}: the dog ran to the park {i % 7} times." for i in range(60)]
JSON_ONLY = "A JSON text may hold <|endoftext|> literally: it stays text, not a document end."


def _write_text(path: Path, docs: list[str], compress: bool = False) -> Path:
    text = "".join(f"{d}\n{EOD_TEXT}\n" for d in docs)
    if compress:
        with lzma.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _documents(prefix: Path) -> list[np.ndarray]:
    store = TokenStore.open(prefix)
    return [np.asarray(store.document(i)) for i in range(store.num_documents)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, request) -> Path:
    """A private cache for the synthetic corpus, also used by CLI subprocesses."""
    root = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEGATRON_MOE_CACHE", str(root))
    request.addfinalizer(mp.undo)
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A small prepared dataset: text + JSON lines (one file xz-compressed), BPE trained on it."""
    d = tmp_path_factory.mktemp("prep")
    _write_text(d / "a.txt.xz", DOCS[:30], compress=True)
    with open(d / "b.jsonl", "w", encoding="utf-8") as f:
        for doc in DOCS[30:] + [JSON_ONLY]:
            f.write(json.dumps({"text": doc, "id": 1}) + "\n")
    prepare_dataset([d / "a.txt.xz", d / "b.jsonl"], d / "out", vocab_size=300, valid_fraction=0.2, progress=False)
    return d


# ---------------------------------------------------------------- preprocessing


def test_round_trip_decode_equals_input_documents(prepared):
    out = prepared / "out"
    m = read_manifest(out)
    tok = load_tokenizer(out / "tokenizer.json")
    decoded = []
    for split in ("train", "valid"):
        docs = _documents(out / split)
        assert len(docs) == m["splits"][split]["documents"] > 0
        for ids in docs:
            assert ids[-1] == tok.eod_id and tok.eod_id not in ids[:-1]
            decoded.append(tok.decode(ids[:-1]))
    assert sorted(decoded) == sorted([d.strip() for d in DOCS] + [JSON_ONLY])
    assert m["documents"] == len(DOCS) + 1 and m["bytes"] == sum(len(d.encode()) for d in DOCS + [JSON_ONLY])
    assert m["tokens"] == m["splits"]["train"]["tokens"] + m["splits"]["valid"]["tokens"]
    assert m["tokenizer"]["vocab_size"] == 300 and m["dtype"] == "uint16"


def test_output_is_readable_by_megatron_core(prepared):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prepared / "out" / "train"))
    mine = _documents(prepared / "out" / "train")
    assert len(ds) == len(mine)
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i], mine[i])


def test_split_is_by_text_so_arms_with_other_tokenizers_hold_out_the_same_documents(prepared, tmp_path):
    other = tmp_path / "other"
    prepare_dataset([prepared / "a.txt.xz", prepared / "b.jsonl"], other, vocab_size=280, valid_fraction=0.2,
                    progress=False)

    def valid_texts(path: Path) -> list[str]:
        tok = load_tokenizer(path / "tokenizer.json")
        return [tok.decode(ids[:-1]) for ids in _documents(path / "valid")]

    assert valid_texts(other) == valid_texts(prepared / "out")
    assert read_manifest(other)["tokenizer"]["sha256"] != read_manifest(prepared / "out")["tokenizer"]["sha256"]


def test_copies_of_one_text_land_in_the_same_split_wherever_they_stand(tmp_path):
    """The split is keyed by the text, not by where a document stands: 12 texts, each 10 times at scattered places,
    every copy of a text on one side."""
    from collections import Counter

    texts = [f"Story {i}: a fox and a hen met at gate number {i * 3}." for i in range(12)]
    _write_text(tmp_path / "d.txt", texts * 10)
    prepare_dataset([tmp_path / "d.txt"], tmp_path / "out", vocab_size=280, valid_fraction=0.3, progress=False)
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    sides = {split: Counter(tok.decode(d[:-1]).strip() for d in _documents(tmp_path / "out" / split))
             for split in ("train", "valid")}
    assert sides["train"] and sides["valid"]
    assert set(sides["train"]) | set(sides["valid"]) == set(texts)
    assert all(n == 10 for side in sides.values() for n in side.values()), sides


def test_workers_and_loaded_tokenizer_give_identical_files(prepared, tmp_path):
    inputs = [prepared / "a.txt.xz", prepared / "b.jsonl"]
    tok = prepared / "out" / "tokenizer.json"
    prepare_dataset(inputs, tmp_path / "w2", tokenizer=tok, valid_fraction=0.2, workers=2, progress=False)
    a, b = read_manifest(prepared / "out")["checksums"], read_manifest(tmp_path / "w2")["checksums"]
    assert a == b


def test_directory_input_and_valid_input(tmp_path):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    _write_text(src / "one.txt", DOCS[:20])
    _write_text(src / "sub" / "two.txt.xz", DOCS[20:40], compress=True)
    (src / "ignored.csv").write_text("not a corpus\n")
    valid = _write_text(tmp_path / "valid.txt", DOCS[40:])
    m = prepare_dataset([src], tmp_path / "out", vocab_size=300, valid_inputs=[valid], progress=False)
    assert m["splits"]["train"]["documents"] == 40 and m["splits"]["valid"]["documents"] == len(DOCS) - 40
    assert [Path(i["path"]).name for i in m["inputs"]] == ["one.txt", "two.txt.xz"]


def test_existing_output_needs_force(prepared, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(prepared / "out", out)
    with pytest.raises(ConfigError, match="already exists"):
        prepare_dataset([prepared / "b.jsonl"], out, vocab_size=300, valid_fraction=0.2, progress=False)
    m = prepare_dataset([prepared / "b.jsonl"], out, vocab_size=300, valid_fraction=0.2, force=True, progress=False)
    assert read_manifest(out) == m
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old directories left


# ---------------------------------------------------------------- schedules


def _stream_docs(sch: Schedule, total: int) -> list[tuple[int, int, int]]:
    return list(sch.segments(0, total))


@pytest.mark.parametrize("epochs", [1.0, 3.0, 2.5])
def test_budget_and_epochs_give_exactly_r_times_b_tokens(epochs):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=300)
    budget, seq = 10_000, 64
    sch = Schedule(lengths, seq, seed=7, unique_tokens=budget, epochs=epochs)
    u = sch.unique_tokens
    assert u <= budget and budget - u < lengths.max()  # whole documents, never over the budget
    assert int(lengths[sch.selected].sum()) == u
    assert sch.total_tokens == int(epochs * u)
    covered = sch.num_samples * seq + 1  # consecutive samples share one token
    assert 0 <= epochs * u - covered < seq + 1  # R x B tokens, to within one sequence

    # Each full epoch holds every unique document exactly once, whole; epochs are shuffled differently.
    segs = _stream_docs(sch, sch.total_tokens)
    pos, orders = 0, []
    for e in range(int(np.ceil(epochs))):
        ids, _ = sch.epoch_order(e)
        assert sorted(ids.tolist()) == sorted(sch.selected.tolist())
        orders.append(ids.tolist())
    per_epoch: list[list[int]] = [[] for _ in orders]
    for doc, off, n in segs:
        e = pos // u
        if off == 0:
            per_epoch[e].append(doc)
        pos += n
    for e in range(int(epochs)):
        assert per_epoch[e] == orders[e]
    if len(orders) > 1:
        assert orders[0] != orders[1]
    with pytest.raises(ConfigError):
        list(sch.segments(sch.total_tokens - 5, 10))


def test_smaller_budget_is_a_subset_and_seed_changes_order():
    lengths = np.full(100, 10)
    small = Schedule(lengths, 16, seed=1, unique_tokens=200)
    big = Schedule(lengths, 16, seed=1, unique_tokens=500)
    assert set(small.selected) < set(big.selected) and small.unique_tokens == 200
    other = Schedule(lengths, 16, seed=2, unique_tokens=200)
    assert set(other.selected) != set(small.selected)


def test_consumed_tokens_and_bad_schedules():
    lengths = np.full(50, 20)
    assert Schedule(lengths, 16, 0, consumed_tokens=3000).epochs == 3.0
    with pytest.raises(ConfigError, match="exceeds"):
        Schedule(lengths, 16, 0, unique_tokens=10_000)
    with pytest.raises(ConfigError, match="smaller than"):
        Schedule(lengths, 16, 0, unique_tokens=5)
    with pytest.raises(ConfigError, match="both set"):
        DataConfig(epochs=2, consumed_tokens=10).validate()


# ---------------------------------------------------------------- the trainer's interface


def test_synthetic_source_batches(cache):
    ds = build_data_source(DataConfig(synthetic_documents=400), seq_length=32, global_batch_size=8)
    b = ds.train_batch(0)
    assert b.shape == (8, 33) and b.dtype == np.int64
    assert 0 <= b.min() and b.max() < ds.vocab_size
    np.testing.assert_array_equal(b[0, -1], b[1, 0])  # samples share one token: each token a target once
    again = build_data_source(DataConfig(synthetic_documents=400), seq_length=32, global_batch_size=8)
    for step in (0, 1, 57):
        np.testing.assert_array_equal(ds.train_batch(step), again.train_batch(step))
    v = ds.valid_batches(4, 3)
    assert len(v) == 3 and all(x.shape == (4, 33) for x in v)
    np.testing.assert_array_equal(np.stack(v), np.stack(again.valid_batches(4, 3)))
    assert 2.0 < ds.bytes_per_token < 6.0
    assert "named" in ds.decode(np.concatenate([x[:-1] for x in b]))  # real text, as the stories have it
    d = ds.describe(train_steps=100)
    assert d["consumed_tokens"] == 100 * 8 * 32 and d["unique_documents"] == d["train_documents"]
    with pytest.raises(ConfigError, match="validation split"):
        ds.valid_batches(64, 100)


def test_describe_reports_the_steps_trained_not_the_whole_bounded_schedule(cache):
    cfg = DataConfig(synthetic_documents=400, epochs=4)
    ds = build_data_source(cfg, seq_length=32, global_batch_size=8, train_steps=10)
    d = ds.describe()  # the run's length, as the trainer calls it
    assert d["consumed_tokens"] == 10 * 8 * 32 and d["epochs"] == pytest.approx(10 * 8 * 32 / d["unique_tokens"])
    assert d["schedule_tokens"] == 4 * d["unique_tokens"] and d["num_steps"] > 10
    assert ds.describe(5)["consumed_tokens"] == 5 * 8 * 32  # as the study calls it
    whole = build_data_source(cfg, seq_length=32, global_batch_size=8).describe()  # no run length: the schedule
    assert whole["consumed_tokens"] == whole["num_steps"] * 8 * 32 and whole["epochs"] == pytest.approx(4, rel=0.01)


def test_synthetic_corpus_needs_a_validation_document(cache, tmp_path):
    with pytest.raises(ConfigError) as exc:
        synthetic_dataset(20, 512, root=tmp_path / "c")
    assert str(exc.value) == (
        "data.synthetic_documents = 20 leaves the synthetic corpus no validation documents; use >= 21"
    )
    assert not (tmp_path / "c").exists()  # refused before anything is written
    with pytest.raises(ConfigError, match="data.synthetic_documents = 20 must be >= 21"):  # the config says so first
        build_data_source(DataConfig(synthetic_documents=20), seq_length=32, global_batch_size=8)
    ds = build_data_source(DataConfig(synthetic_documents=21), seq_length=32, global_batch_size=8)
    assert ds.valid.num_documents == 1 and ds.train.num_documents == 20


def test_synthetic_corpus_is_identical_when_rebuilt(tmp_path):
    a = synthetic_dataset(300, 300, root=tmp_path / "a")
    b = synthetic_dataset(300, 300, root=tmp_path / "b")
    assert read_manifest(a)["checksums"] == read_manifest(b)["checksums"]
    assert synthetic_dataset(300, 300, root=tmp_path / "a") == a  # cached
    assert [p.name for p in (tmp_path / "a").iterdir()] == [a.name]


def test_stream_is_the_epoch_shuffled_documents_and_reaches_r_times_b(cache):
    cfg = DataConfig(synthetic_documents=400, unique_tokens=5000, epochs=2.5, seed=3)
    seq, gbs = 32, 4
    ds = build_data_source(cfg, seq, gbs)
    sch = ds.schedule
    expected = np.concatenate([
        np.concatenate([np.asarray(ds.train.document(i)) for i in sch.epoch_order(e)[0]]) for e in range(3)
    ])[: sch.total_tokens]
    got = np.concatenate([ds.train_batch(s)[:, :-1].reshape(-1) for s in range(ds.num_steps)])
    np.testing.assert_array_equal(got, expected[: len(got)])
    assert ds.num_steps == sch.num_samples // gbs
    assert sch.total_tokens - (sch.num_samples * seq + 1) < seq + 1
    with pytest.raises(ConfigError, match="optimizer steps"):
        ds.train_batch(ds.num_steps)
    with pytest.raises(ConfigError, match="exceeds"):
        build_data_source(cfg, seq, gbs, train_steps=ds.num_steps + 1)


def test_fingerprint_depends_on_data_schedule_not_model(cache):
    def fp(overrides: dict, data: dict | None = None, seq: int | None = None) -> str:
        run = from_dict(RunConfig, {"model": overrides, "data": {"synthetic_documents": 400, **(data or {})}})
        return build_data_source(run.data, seq or run.model.seq_length, run.train.global_batch_size).fingerprint()

    dense = fp({"seq_length": 64, "hidden_size": 64, "num_layers": 2})
    moe = fp({"seq_length": 64, "hidden_size": 128, "num_layers": 4, "moe": {"num_experts": 8, "top_k": 2}})
    assert dense == moe
    assert fp({"seq_length": 64}, {"seed": 99}) != dense
    assert fp({"seq_length": 32}) != dense
    assert fp({"seq_length": 64}, {"unique_tokens": 20_000, "epochs": 2.0}) != dense


# ---------------------------------------------------------------- the CLI, bad input


def _bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "empty.txt").write_text(f"\n{EOD_TEXT}\n  \n{EOD_TEXT}\n")
    (tmp / "binary.txt").write_bytes(b"fine line\nbad \xff\xfe bytes\n")
    (tmp / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    (tmp / "badjson.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp / "bad_tokenizer.json").write_text('{"not": "a tokenizer"}')
    good = _write_text(tmp / "good.txt", DOCS)
    packed = bytearray(gzip.compress(good.read_bytes()))
    for k in range(12, 20):  # the deflate block's code tables, just after the 10-byte gzip header
        packed[k] ^= 0xFF
    (tmp / "corrupt.txt.gz").write_bytes(bytes(packed))  # zlib.error ("invalid code lengths set"), not OSError
    return {
        "empty": ([str(tmp / "empty.txt")], "corpus is empty"),
        "undecodable": ([str(tmp / "binary.txt")], "binary.txt:2: not UTF-8"),
        "missing-field": ([str(tmp / "nofield.jsonl")], "nofield.jsonl:2: JSON line has no field 'text'"),
        "bad-json": ([str(tmp / "badjson.jsonl")], "badjson.jsonl:2: not valid JSON"),
        "bad-tokenizer": ([str(good), "--tokenizer", str(tmp / "bad_tokenizer.json")], "does not load"),
        "missing-input": ([str(tmp / "nope.txt")], "does not exist"),
        "no-valid-docs": ([str(good), "--valid-fraction", "0"], "valid split is empty"),
        "corrupt-gzip": ([str(tmp / "corrupt.txt.gz")], "corrupt.txt.gz: cannot read (Error -3"),
        "split-seed-overflow": ([str(good), "--split-seed", str(2**63)],
                                f"--split-seed {2**63} must be a signed 64-bit integer"),
    }


@pytest.mark.parametrize(
    "case", ["empty", "undecodable", "missing-field", "bad-json", "bad-tokenizer", "missing-input", "no-valid-docs",
             "corrupt-gzip", "split-seed-overflow"]
)
def test_prepare_refuses_bad_input(tmp_path, case):
    args, message = _bad_cases(tmp_path)[case]
    out = tmp_path / "outdir"
    proc = cli("data", "prepare", *args, "-o", str(out), "--vocab-size", "300", "--quiet", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatron-moe: error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".outdir*"))  # nothing half-written


@pytest.mark.parametrize("damage, message", [
    ("truncate-idx", "train.idx' is corrupt or truncated"),
    ("truncate-bin", "train.bin' is corrupt or truncated"),
    ("corrupt-header", "bad header"),
    ("flip-bin-byte", "train.bin' is corrupt (sha256"),
    ("no-manifest", "has no manifest.json"),
    ("no-tokenizer-file", "tokenizer.json' is missing"),
    ("manifest-is-a-list", "not a megatron-moe dataset manifest"),
    ("no-eod-id", "incomplete manifest (tokenizer.eod_id is missing"),
    ("no-idx-checksum", "incomplete manifest (checksums.train.idx is missing"),
    ("no-valid-bytes-per-token", "incomplete manifest (splits.valid.bytes_per_token is missing"),
])
def test_inspect_refuses_corrupt_dataset(prepared, tmp_path, damage, message):
    d = tmp_path / "ds"
    shutil.copytree(prepared / "out", d)
    idx, bin_, mf = d / "train.idx", d / "train.bin", d / "manifest.json"
    m = json.loads(mf.read_text())
    if damage == "truncate-idx":
        idx.write_bytes(idx.read_bytes()[:-9])
    elif damage == "truncate-bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif damage == "corrupt-header":
        idx.write_bytes(b"XXXX" + idx.read_bytes()[4:])
    elif damage == "flip-bin-byte":
        raw = bytearray(bin_.read_bytes())
        raw[10] ^= 0xFF
        bin_.write_bytes(bytes(raw))
    elif damage == "no-manifest":
        mf.unlink()
    elif damage == "no-tokenizer-file":
        (d / "tokenizer.json").unlink()
    elif damage == "manifest-is-a-list":
        mf.write_text("[]")
    else:
        node, key = {"no-eod-id": (m["tokenizer"], "eod_id"), "no-idx-checksum": (m["checksums"], "train.idx"),
                     "no-valid-bytes-per-token": (m["splits"]["valid"], "bytes_per_token")}[damage]
        del node[key]
        mf.write_text(json.dumps(m))
    with pytest.raises(ConfigError, match=re.escape(message)):
        DataSource(d, DataConfig(), 16, 2)
    proc = cli("data", "inspect", str(d), "--seq-length", "16", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("megatron-moe: error:") and message in lines[0], proc.stderr


def test_cli_prepare_and_inspect(prepared, tmp_path):
    out = tmp_path / "ds"
    proc = cli("data", "prepare", str(prepared / "a.txt.xz"), str(prepared / "b.jsonl"), "-o", str(out),
               "--vocab-size", "300", "--valid-fraction", "0.2", "--workers", "2")
    assert f"{len(DOCS) + 1} documents" in proc.stdout and "MB/s" in proc.stdout
    assert read_manifest(out)["checksums"] == read_manifest(prepared / "out")["checksums"]
    proc = cli("data", "inspect", str(out), "--seq-length", "16", "--global-batch-size", "2", "--epochs", "2",
               "--json", "--verify")
    info = json.loads(proc.stdout)
    ds = build_data_source(DataConfig(path=str(out), epochs=2), 16, 2)
    assert info["fingerprint"] == ds.fingerprint() and info["epochs"] == pytest.approx(ds.describe()["epochs"])
    text = cli("data", "inspect", str(out), "--seq-length", "16").stdout
    assert "fingerprint" in text and "unique" in text


def test_cli_inspect_synthetic(cache):
    proc = cli("data", "inspect", "--train-steps", "10")
    assert "synthetic" in proc.stdout and "fingerprint" in proc.stdout
    info = json.loads(cli("data", "inspect", "--train-steps", "10", "--epochs", "2", "--json").stdout)
    assert info["consumed_tokens"] == 10 * 8 * 256 and info["schedule_tokens"] == 2 * info["unique_tokens"]
    proc = cli("data", "inspect", "--train-steps", "100000", "--epochs", "2", check=False)
    assert proc.returncode == 2 and "exceeds the" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------- real data: TinyStories excerpts


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"TinyStories excerpts not found at {SHARED_DATA}")
def test_tinystories_collected(tmp_path):
    train, valid = SHARED_DATA / "tinystories-collected.txt.xz", SHARED_DATA / "tinystories-collected-valid.txt.xz"
    m = prepare_dataset([train], tmp_path / "ts", vocab_size=1024, valid_inputs=[valid], progress=False)
    assert m["splits"]["train"]["documents"] == 10_270 and m["splits"]["valid"]["documents"] == 50
    sep_bytes = len(f"\n{EOD_TEXT}\n") * 10_320  # each story is followed by one separator line
    assert m["bytes"] == 8_587_487 + 34_779 - sep_bytes  # sizes from the directory's README
    assert 2.5 < m["bytes_per_token"] < 5.0
    with lzma.open(valid, "rt", encoding="utf-8") as f:
        stories = [s for s in f.read().split(f"\n{EOD_TEXT}\n") if s]
    tok = load_tokenizer(tmp_path / "ts" / "tokenizer.json")
    assert [tok.decode(ids[:-1]) for ids in _documents(tmp_path / "ts" / "valid")] == stories
    ds = build_data_source(DataConfig(path=str(tmp_path / "ts"), unique_tokens=500_000, epochs=4), 256, 16)
    d = ds.describe()
    assert d["unique_tokens"] <= 500_000 and d["epochs"] == pytest.approx(4, rel=0.01)
    assert ds.fingerprint() == build_data_source(
        DataConfig(path=str(tmp_path / "ts"), unique_tokens=500_000, epochs=4), 256, 16).fingerprint()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"TinyStories excerpts not found at {SHARED_DATA}")
def test_tinystories_v2_sample_has_five_stories(tmp_path):
    m = prepare_dataset([SHARED_DATA / "tinystories-v2-sample.txt.xz"], tmp_path / "v2", vocab_size=300,
                        valid_fraction=0.5, progress=False)
    assert m["documents"] == 5 and m["skipped_empty_documents"] == 0


# ---------------------------------------------------------------- optional tokenizers (skipped when absent)


def test_sentencepiece_tokenizer(prepared, tmp_path):
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(DOCS * 3), model_prefix=str(tmp_path / "sp"), vocab_size=400,
        model_type="bpe", byte_fallback=True, minloglevel=2,
    )
    src = prepared / "b.jsonl"
    m = prepare_dataset([src], tmp_path / "out", tokenizer=tmp_path / "sp.model", valid_fraction=0.2, progress=False)
    assert m["tokenizer"]["kind"] == "sentencepiece" and (tmp_path / "out" / "tokenizer.model").is_file()
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.model")
    assert tok.eod_id == m["tokenizer"]["eod_id"]
    docs = _documents(tmp_path / "out" / "train") + _documents(tmp_path / "out" / "valid")
    assert all(ids[-1] == tok.eod_id for ids in docs)
    assert len(docs) == len(DOCS) - 30 + 1


def test_tiktoken_tokenizer(prepared, tmp_path):
    pytest.importorskip("tiktoken")
    import base64

    # A minimal BPE file: the 256 bytes, then a few merges (each built from lower-ranked tokens).
    tokens = [bytes([i]) for i in range(256)] + [b"th", b"the", b" the", b"do", b"dog"]
    (tmp_path / "tiny.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                                                    for r, t in enumerate(tokens)))
    m = prepare_dataset([prepared / "b.jsonl"], tmp_path / "out", tokenizer=tmp_path / "tiny.tiktoken",
                        valid_fraction=0.2, progress=False)
    assert m["tokenizer"]["kind"] == "tiktoken" and m["tokenizer"]["vocab_size"] == len(tokens) + 1
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.tiktoken")
    decoded = sorted(tok.decode(ids[:-1]) for p in ("train", "valid") for ids in _documents(tmp_path / "out" / p))
    assert decoded == sorted(DOCS[30:] + [JSON_ONLY])


def test_line_documents_and_the_warning_for_one_long_document(tmp_path):
    lines = [f"story number {i} is about a cat named Tom {i % 7}." for i in range(400)]
    src = tmp_path / "lines.txt"
    src.write_text("\n".join(lines) + "\n")
    as_one = cli("data", "prepare", str(src), "-o", str(tmp_path / "one"), "--vocab-size", "300", "--quiet",
                 check=False)
    assert as_one.returncode == 2
    assert "400 lines and no '<|endoftext|>' separator" in as_one.stderr and "--line-documents" in as_one.stderr
    assert as_one.stderr.strip().splitlines()[-1].startswith("megatron-moe: error: the valid split is empty (1 ")
    assert "--line-documents" in as_one.stderr.strip().splitlines()[-1]  # the remedy, not --valid-fraction
    out = tmp_path / "per_line"
    cli("data", "prepare", str(src), "-o", str(out), "--vocab-size", "300", "--line-documents", "--quiet",
        "--valid-fraction", "0.1")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"] == 400


def test_tokenizer_by_hub_name_from_the_local_hub_cache_or_one_line_error(tmp_path):
    """A Hub model name resolves through huggingface_hub's cache (here laid out by hand, offline); an unknown
    name is a one-line error naming it."""
    corpus = _write_text(tmp_path / "corpus.txt", DOCS)
    source = tmp_path / "src"
    cli("data", "prepare", str(corpus), "-o", str(source), "--vocab-size", "300", "--quiet", "--valid-fraction", "0.2")
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copyfile(source / "tokenizer.json", snapshot / "tokenizer.json")
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "by_name"
    cli("data", "prepare", str(corpus), "-o", str(out), "--tokenizer", "acme/tiny", "--quiet", "--valid-fraction",
        "0.2", env=env)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == json.loads((source / "manifest.json").read_text())["tokenizer"]["sha256"]
    bad = cli("data", "prepare", str(corpus), "-o", str(tmp_path / "x"), "--tokenizer", "acme/none",
              "--quiet", env=env, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert ("tokenizer 'acme/none' is not a file nor in the Hugging Face cache, and the Hub cannot be reached "
            "(HF_HUB_OFFLINE is set): give a local tokenizer.json") in bad.stderr
    # without HF_HUB_OFFLINE, on a machine that cannot reach the Hub (this test points the Hub at a closed port),
    # the answer comes at once rather than after huggingface_hub's retries
    with socket.socket() as s:  # a port nothing listens on (not megatron_moe.parallel's: no torch in this process,
        s.bind(("127.0.0.1", 0))  # whose tests fork workers)
        port = s.getsockname()[1]
    closed = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": f"https://127.0.0.1:{port}"}
    bad = cli("data", "prepare", str(corpus), "-o", str(tmp_path / "x"), "--tokenizer", "acme/none",
              "--quiet", env=closed, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "and the Hub cannot be reached (127.0.0.1: Connection refused)" in bad.stderr
    assert "Retry" not in bad.stderr  # huggingface_hub's retries never started


def test_progress_lines_outside_a_terminal_show_percent_and_eta(capsys):
    from megatron_moe.data.prepare import Progress

    show = Progress("prepare x", total=8_000_000, enabled=True)
    assert capsys.readouterr().err == "prepare x: started, 8.0 MB to read\n"  # at once, not after 10 s
    show.last -= 60  # as if the last line was a minute ago
    show.update(2_000_000, 10, 500)
    err = capsys.readouterr().err
    assert re.match(r"prepare x: 25% \(2\.0 MB of 8\.0 MB\), eta \d+ s, 10 documents, 500 tokens\n$", err), err
    show.update(3_000_000, 11, 600)  # within 10 s of the last line: nothing
    assert capsys.readouterr().err == ""
    docs = Progress("import x", total=9_267, enabled=True, unit="doc")
    docs.last -= 60
    docs.update(4_000, 4_000, 0)
    assert capsys.readouterr().err.splitlines()[1].startswith("import x: 43% (4,000 doc of 9,267 doc), eta ")


def test_read_meter_counts_compressed_bytes_on_disk(tmp_path):
    from megatron_moe.data.inputs import ReadMeter, iter_documents

    path = _write_text(tmp_path / "a.txt.xz", DOCS * 20, compress=True)
    meter = ReadMeter([path])
    positions = [meter.position() for _ in iter_documents(path, meter=meter)]
    assert positions == sorted(positions) and positions[-1] <= meter.total == path.stat().st_size
    assert meter.position() == meter.total


def test_verify_catches_token_ids_outside_the_vocabulary_even_with_rewritten_checksums(prepared, tmp_path):
    from megatron_moe.data.store import sha256_file

    ds = tmp_path / "ds"
    shutil.copytree(prepared / "out", ds)
    manifest = json.loads((ds / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"])
    tokens = np.memmap(ds / "train.bin", dtype=dtype, mode="r+")
    tokens[3] = manifest["tokenizer"]["vocab_size"] + 5
    tokens.flush()
    del tokens
    manifest["checksums"]["train.bin"] = sha256_file(ds / "train.bin")
    (ds / "manifest.json").write_text(json.dumps(manifest))
    proc = cli("data", "inspect", str(ds), "--verify", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"token id {manifest['tokenizer']['vocab_size'] + 5}" in proc.stderr


def test_a_killed_prepare_leaves_no_lasting_temp_dir(tmp_path):
    """A build killed mid-way leaves `.<name>.tmp-<host>-<pid>-*`; the next prepare of that output on the same
    host removes it once its process is gone, and leaves a live process's or another host's directory alone."""
    import socket
    import subprocess

    corpus = _write_text(tmp_path / "c.txt", DOCS)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname().replace("-", "_")
    stale = tmp_path / f".out.tmp-{host}-{dead.pid}-abc"
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-xyz"
    other_host = tmp_path / f".out.tmp-{host}x-{dead.pid}-abc"  # another machine's build: not ours to judge
    for d in (stale, live, other_host):
        d.mkdir()
    prepare_dataset([corpus], tmp_path / "out", vocab_size=300, valid_fraction=0.2, progress=False)
    assert not stale.exists() and live.exists() and other_host.exists()
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_fingerprint_sees_a_change_in_a_later_epochs_order(cache, monkeypatch):
    """The fingerprint covers the whole stream: a change to the order of epoch 3 only (the first samples, the
    document selection and every schedule field unchanged) gives another fingerprint."""
    import megatron_moe.data.schedule as schedule

    cfg = DataConfig(synthetic_documents=400, unique_tokens=20_000, epochs=4)
    reference = build_data_source(cfg, 32, 8)
    before, first_batch = reference.fingerprint(), reference.train_batch(0).tobytes()
    assert build_data_source(cfg, 32, 8).fingerprint() == before  # deterministic
    original = schedule._seeded_order

    def swapped_in_epoch_3(ids, seed, stream):
        out = original(ids, seed, stream)
        return out[[1, 0, *range(2, len(out))]] if stream == 3 else out  # epoch 2 (0-based) swaps two docs

    monkeypatch.setattr(schedule, "_seeded_order", swapped_in_epoch_3)
    changed = build_data_source(cfg, 32, 8)
    assert changed.train_batch(0).tobytes() == first_batch  # the head of the stream is unchanged
    assert changed.fingerprint() != before


@pytest.mark.slow
def test_builtin_tinystories_is_prepared_once_and_reused(tmp_path, capsys, monkeypatch):
    from megatron_moe.data.corpora import TINYSTORIES_VALID_FRACTION, tinystories_dataset

    path = tinystories_dataset(512, root=tmp_path)
    assert "preparing the built-in TinyStories corpus" in capsys.readouterr().err
    manifest = read_manifest(path)
    assert manifest["documents"] == 10_270
    valid = manifest["splits"]["valid"]
    assert abs(valid["documents"] / 10_270 - TINYSTORIES_VALID_FRACTION) < 0.01 and valid["tokens"] >= 40_000
    stamp = (path / "manifest.json").stat().st_mtime_ns
    assert tinystories_dataset(512, root=tmp_path) == path  # second use: the cache, not a new build
    assert (path / "manifest.json").stat().st_mtime_ns == stamp
    assert "preparing" not in capsys.readouterr().err
    monkeypatch.setenv("MEGATRON_MOE_CACHE", str(tmp_path))
    ds = build_data_source(DataConfig(corpus="tinystories", corpus_vocab_size=512), 64, 8)
    assert ds.builtin == "tinystories" and ds.vocab_size == 512 and ds.path == path

    # Read more than MAX_UNASKED_EPOCHS times over without the schedule asking, the built-in text is refused; with
    # data.epochs asking for those passes it is not; a run within one pass gets no note, a repeating one does.
    epoch_steps = ds.schedule.unique_tokens / (64 * 8)
    too_many = math.ceil(epoch_steps * (MAX_UNASKED_EPOCHS + 0.5))
    with pytest.raises(ConfigError) as exc:
        build_data_source(DataConfig(corpus="tinystories", corpus_vocab_size=512), 64, 8, train_steps=too_many)
    assert str(exc.value).startswith(f"train.train_steps = {too_many} would read the built-in tinystories corpus 4.5")
    assert str(exc.value).endswith("or ask for the repeats with data.epochs = 5")
    asked = build_data_source(DataConfig(corpus="tinystories", corpus_vocab_size=512, epochs=5), 64, 8,
                              train_steps=too_many)
    assert asked.repeats(too_many) is None
    assert ds.repeats(int(epoch_steps)) is None
    assert ds.repeats(math.ceil(epoch_steps * 2)).startswith("note: the built-in tinystories corpus is read 2.00 times")


def test_a_tokenizer_directory_without_tokenizer_json_is_one_line(tmp_path):
    (tmp_path / "megatron_vocab").mkdir()
    (tmp_path / "megatron_vocab" / "vocab.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path / "megatron_vocab")


def test_parquet_text_column_is_read_and_a_missing_column_is_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS, "id": list(range(len(DOCS)))}), tmp_path / "c.parquet", row_group_size=16)
    m = prepare_dataset([tmp_path / "c.parquet"], tmp_path / "out", vocab_size=300, valid_fraction=0.2, progress=False)
    text_twin = prepare_dataset([_write_text(tmp_path / "c.txt", DOCS)], tmp_path / "twin", vocab_size=300,
                                valid_fraction=0.2, progress=False)
    assert m["documents"] == len(DOCS) and m["checksums"]["train.bin"] == text_twin["checksums"]["train.bin"]
    proc = cli("data", "prepare", str(tmp_path / "c.parquet"), "-o", str(tmp_path / "x"), "--text-key", "body",
               "--quiet", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "has no column 'body'" in proc.stderr


# ---------------------------------------------------------------- storage errors: one line, nothing half-written


def _without_root_reads(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`megatron-moe ARGS` as a user that file modes apply to: as root, with the capabilities that let root read and
    write anything dropped (setpriv); as anyone else, as is."""
    prefix = MODULE
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.fail("setpriv (util-linux) is needed to test file modes as root")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *MODULE]
    return cli(*args, prefix=prefix, cwd=cwd, check=False)


@pytest.mark.parametrize("target", ["train.bin", "train.idx", "manifest.json"])
def test_an_unreadable_dataset_file_is_one_line(prepared, tmp_path, target):
    data = tmp_path / "data"
    shutil.copytree(prepared / "out", data)
    (data / target).chmod(0)
    proc = _without_root_reads("data", "inspect", str(data), "--verify", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"megatron-moe: error: permission denied on '{data / target}': this command needs "
                                   "to read it (or write where it goes); check its mode and owner")


def test_unreadable_config_and_unwritable_output_are_one_line(prepared, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[train]\nlr = 1e-3\n")
    config.chmod(0)
    proc = _without_root_reads("config", "show", str(config), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"megatron-moe: error: config file '{config}' is not readable (permission denied)")
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    proc = _without_root_reads("data", "prepare", str(prepared / "b.jsonl"), "-o", str(parent / "out"),
                               "--vocab-size", "300", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"megatron-moe: error: permission denied on '{parent}': this command needs to read it (or write where it "
        "goes); check its mode and owner")
    assert list(parent.iterdir()) == []


def test_a_full_disk_while_preparing_is_one_line_and_leaves_nothing(prepared, tmp_path, monkeypatch, capsys):
    from megatron_moe.cli import main
    from megatron_moe.data import prepare

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write onto a full disk raises: no file named

    monkeypatch.setattr(prepare, "write_dataset", full)
    out = tmp_path / "out"
    assert main(["data", "prepare", str(prepared / "b.jsonl"), "-o", str(out), "--vocab-size", "300"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"megatron-moe: error: no space left on device writing '{out}'; free space there or write elsewhere")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory


def test_vocab_size_zero_is_the_datas(tmp_path):
    """model.vocab_size = 0 takes the tokenizer's vocabulary on loading: a prepared dataset's (from its manifest),
    the built-in corpus's BPE size; a study and `train` see the number; a missing dataset is one line."""
    from megatron_moe.config import load_run_config
    from megatron_moe.data.source import with_data_vocabulary
    from megatron_moe.study.spec import load_study

    corpus = _write_text(tmp_path / "corpus.txt", DOCS)
    prepare_dataset([corpus], tmp_path / "data", vocab_size=300, valid_fraction=0.2, progress=False)
    vocab = read_manifest(tmp_path / "data")["tokenizer"]["vocab_size"]
    assert 256 < vocab <= 300
    cfg = with_data_vocabulary(load_run_config(None, ["model.vocab_size=0", f"data.path={tmp_path / 'data'}"]))
    assert cfg.model.vocab_size == vocab
    assert with_data_vocabulary(load_run_config(None, ["model.vocab_size=0", "data.corpus=tinystories"])).model.vocab_size == 4096
    assert with_data_vocabulary(load_run_config(None, ["model.vocab_size=0", "data.corpus_vocab_size=1000"])).model.vocab_size == 1000
    assert with_data_vocabulary(load_run_config(None, ["model.vocab_size=777"])).model.vocab_size == 777  # as set
    study = load_study(REPO / "examples" / "tiny_three_arm" / "cpu.toml", ["model.vocab_size=0"])
    assert study.model.vocab_size == study.data.corpus_vocab_size == 2048  # the example's built-in TinyStories BPE
    plan = json.loads(cli("plan", "examples/tiny_moe.toml", "--json", "model.vocab_size=0",
                          f"data.path={tmp_path / 'data'}").stdout)
    assert plan["ledger"]["padded_vocab_size"] == 384  # 256 < vocab <= 300, padded to a multiple of 128
    bad = cli("train", "model.vocab_size=0", f"data.path={tmp_path / 'none'}", check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        f"megatron-moe: error: model.vocab_size = 0 takes the vocabulary from data.path = '{tmp_path / 'none'}', which "
        "holds no prepared dataset (manifest.json); set model.vocab_size or prepare the data first")
