"""Megatron-LM interoperability: our datasets are megatron-core indexed datasets, and a Megatron-LM-tokenized
corpus is imported without re-tokenizing, then trained on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_moe import directories
from megatron_moe.data.prepare import prepare_dataset
from megatron_moe.data.store import TokenStore
from megatron_moe.data.tokenizers import load_tokenizer
from tests.conftest import TINY, cli

STORIES = [f"Story {i}: a {['red', 'blue', 'green'][i % 3]} bird sang {i % 5} songs in the garden." for i in range(120)]


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ours")
    (d / "stories.txt").write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES))
    prepare_dataset([d / "stories.txt"], d / "ds", vocab_size=300, valid_fraction=0.2, progress=False)
    return d / "ds"


def _megatron_lm_dataset(prefix: Path, tokenizer: Path, texts: list[str], append_eod: bool) -> None:
    """What Megatron-LM's preprocess_data.py writes: megatron-core's builder, one sequence per document."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tok = load_tokenizer(tokenizer)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(tok.vocab_size))
    for ids in tok.encode_batch(texts):
        ids = ids + [tok.eod_id] if append_eod else ids
        builder.add_document(np.array(ids, dtype=np.int64), [len(ids)])
    builder.finalize(f"{prefix}.idx")


def test_our_splits_are_read_by_megatron_core_indexed_dataset(ours):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    mine = TokenStore.open(ours / "train")
    theirs = IndexedDataset(str(ours / "train"))
    assert len(theirs) == mine.num_documents > 50
    for i in (0, 7, mine.num_documents - 1):
        np.testing.assert_array_equal(theirs[i], mine.document(i))


@pytest.mark.slow
@pytest.mark.parametrize("append_eod", [True, False])
def test_megatron_lm_corpus_is_imported_without_retokenizing_and_trains(ours, tmp_path, append_eod):
    prefix = tmp_path / "corpus_text_document"
    _megatron_lm_dataset(prefix, ours / "tokenizer.json", STORIES, append_eod)
    out = tmp_path / "imported"
    cli("data", "import", str(prefix), "-o", str(out), "--tokenizer", str(ours / "tokenizer.json"),
        "--valid-fraction", "0.2", "--quiet")
    manifest = json.loads((out / "manifest.json").read_text())
    original = json.loads((ours / "manifest.json").read_text())
    # The same documents, split by the same text hash, with EOD appended once: the same token streams.
    assert manifest["splits"]["train"]["documents"] == original["splits"]["train"]["documents"]
    for split in ("train", "valid"):
        a, b = TokenStore.open(out / split), TokenStore.open(ours / split)
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert manifest["splits"]["valid"]["bytes_per_token"] == pytest.approx(
        original["splits"]["valid"]["bytes_per_token"])
    run = tmp_path / "run"
    cli("train", *TINY, "model.vocab_size=512", f"data.path={out}", "train.train_steps=3", "train.eval_iters=1",
        f"train.output_dir={run}")
    assert json.loads((run / directories.RESULT).read_text())["steps"] == 3


def test_import_refuses_token_ids_beyond_the_tokenizer_in_one_line(ours, tmp_path):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "bad.bin"), dtype=DType.optimal_dtype(70000))
    builder.add_document(np.array([1, 2, 65000], dtype=np.int64), [3])
    builder.finalize(str(tmp_path / "bad.idx"))
    proc = cli("data", "import", str(tmp_path / "bad"), "-o", str(tmp_path / "x"), "--tokenizer",
               str(ours / "tokenizer.json"), "--quiet", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "token id 65000" in proc.stderr and not (tmp_path / "x").exists()
