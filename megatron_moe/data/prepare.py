"""Preparing a dataset: raw documents to a directory of `.bin`/`.idx` files and a manifest (see `store`),
tokenized by a pool of worker processes and published atomically.

The train/validation split is per document and decided by a hash of the document's *text* (not its tokens), so
arms with different tokenizers still hold out the same documents.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_moe.config import ConfigError
from megatron_moe.data.inputs import Document, expand_inputs, iter_documents
from megatron_moe.data.store import DATASET_VERSION, MANIFEST, sha256_file
from megatron_moe.data.tokenizers import EOD_TEXT, TextTokenizer, load_tokenizer, train_bpe_tokenizer
from megatron_moe.files import atomic_write_json


def text_split_value(text: str, split_seed: int) -> float:
    """Hash of a document's text mapped to [0, 1): documents below `valid_fraction` are held out."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=split_seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") / 2.0**64


# ================================================================ preprocessing


class Progress:
    """A throttled one-line progress display on stderr (carriage return on a terminal)."""

    def __init__(self, label: str, enabled: bool = True, interval_s: float = 0.5) -> None:
        self.label, self.enabled, self.interval_s = label, enabled, interval_s
        self.start = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, docs: int, nbytes: int, tokens: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self.last < (self.interval_s if self.tty else 10.0)):
            return
        self.last = now
        mb = nbytes / 1e6
        line = (f"{self.label}: {docs:,} documents, {mb:,.1f} MB, {tokens:,} tokens, "
                f"{mb / max(now - self.start, 1e-9):.2f} MB/s")
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


_WORKER_TOKENIZER: TextTokenizer | None = None


def _worker_init(tok_file: str, eod_token: str | None) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tok_file, eod_token)


def _encode_chunk(
    texts: list[str], tok: TextTokenizer | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode texts and append EOD: (concatenated int64 tokens, tokens per doc, UTF-8 bytes per doc)."""
    tok = tok or _WORKER_TOKENIZER
    assert tok is not None
    ids = tok.encode_batch(texts)
    lens = np.fromiter((len(x) + 1 for x in ids), np.int64, len(ids))
    flat = np.empty(int(lens.sum()), np.int64)
    ends = np.cumsum(lens)
    starts = ends - lens
    for s, e, x in zip(starts, ends, ids):
        flat[s : e - 1] = x
    flat[ends - 1] = tok.eod_id
    nbytes = np.fromiter((len(t.encode("utf-8")) for t in texts), np.int64, len(texts))
    return flat, lens, nbytes


@dataclass
class _SplitWriter:
    """One split's IndexedDatasetBuilder plus running counts."""

    builder: Any
    prefix: Path
    documents: int = 0
    tokens: int = 0
    bytes: int = 0

    def add(self, tokens: np.ndarray, nbytes: int) -> None:
        self.builder.add_document(tokens, [len(tokens)])
        self.documents += 1
        self.tokens += len(tokens)
        self.bytes += nbytes


DocSource = Callable[[], Iterator[tuple[Document, str | None]]]
"""Yields (document, forced split or None) afresh on every call (called once per pass)."""


def _chunks(
    source: DocSource, valid_fraction: float, split_seed: int, stats: dict[str, int], chunk_bytes: int = 1 << 20
) -> Iterator[tuple[list[str], list[bool]]]:
    """Non-empty documents in chunks of about `chunk_bytes`, with their is-validation flags."""
    texts: list[str] = []
    flags: list[bool] = []
    size = produced = 0
    for doc, forced in source():
        if not doc.text:
            stats["skipped_empty"] += 1
            continue
        texts.append(doc.text)
        flags.append(forced == "valid" if forced else text_split_value(doc.text, split_seed) < valid_fraction)
        size += len(doc.text)
        produced += 1
        if size >= chunk_bytes:
            yield texts, flags
            texts, flags, size = [], [], 0
    if not produced:  # refuse early, before a tokenizer is trained or torch is imported
        raise ConfigError("the corpus is empty: no non-empty documents in the inputs")
    if texts:
        yield texts, flags


def write_dataset(
    source: DocSource,
    out_dir: Path,
    *,
    tokenizer_file: str | Path | None,
    vocab_size: int,
    eod_token: str | None,
    valid_fraction: float,
    split_seed: int,
    workers: int,
    progress: bool,
    extra: dict[str, Any],
    label: str = "prepare",
) -> dict[str, Any]:
    """Tokenize `source` into `out_dir` (which must exist and be empty); returns the manifest."""
    stats = {"skipped_empty": 0}
    # Pass 1: the tokenizer (trained on training documents only, so nothing held out leaks into it).
    if tokenizer_file is None:
        def train_texts() -> Iterator[str]:
            for texts, flags in _chunks(source, valid_fraction, split_seed, {"skipped_empty": 0}):
                yield from (t for t, v in zip(texts, flags) if not v)

        tok: TextTokenizer = train_bpe_tokenizer(train_texts(), vocab_size)
        tok_name = "tokenizer.json"
        tok.tok.save(str(out_dir / tok_name))  # type: ignore[attr-defined]
        tok_info = {"trained": True, "source": None, "requested_vocab_size": vocab_size}
    else:
        src = Path(tokenizer_file)
        src = src / "tokenizer.json" if src.is_dir() else src
        tok = load_tokenizer(src, eod_token)
        tok_name = {"hf": "tokenizer.json", "sentencepiece": "tokenizer.model", "tiktoken": "tokenizer.tiktoken"}[
            tok.kind
        ]
        shutil.copyfile(src, out_dir / tok_name)
        tok_info = {"trained": False, "source": str(src)}
    tok_info.update(kind=tok.kind, file=tok_name, vocab_size=tok.vocab_size, eod_id=tok.eod_id,
                    eod_token=tok.eod_token, sha256=sha256_file(out_dir / tok_name))

    # Pass 2: encode and write. The first chunk is read before the builder import pulls in torch +
    # megatron-core (seconds), so that bad input near the start is refused at once.
    import warnings

    chunks = _chunks(source, valid_fraction, split_seed, stats)
    chunks = itertools.chain([next(chunks)], chunks)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(tok.vocab_size)
    writers = {
        name: _SplitWriter(IndexedDatasetBuilder(str(out_dir / f"{name}.bin"), dtype=dtype), out_dir / name)
        for name in ("train", "valid")
    }
    show = Progress(label, progress)
    seen_bytes = 0
    pool = None
    try:
        if workers > 1:
            import multiprocessing as mp

            # Workers load the tokenizer themselves: HF tokenizers objects must not cross a fork once used.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(workers, initializer=_worker_init, initargs=(str(out_dir / tok_name), tok.eod_token))
            pending: list[tuple[list[bool], Any]] = []

            def results() -> Iterator[tuple[list[bool], tuple[np.ndarray, np.ndarray, np.ndarray]]]:
                # Keep at most 2 chunks per worker in flight: bounded memory, order preserved.
                for texts, flags in chunks:
                    pending.append((flags, pool.apply_async(_encode_chunk, (texts,))))
                    if len(pending) >= 2 * workers:
                        f, r = pending.pop(0)
                        yield f, r.get()
                while pending:
                    f, r = pending.pop(0)
                    yield f, r.get()

            stream = results()
        else:
            stream = ((flags, _encode_chunk(texts, tok)) for texts, flags in chunks)
        for flags, (flat, lens, nbytes) in stream:
            ends = np.cumsum(lens)
            for is_valid, e, n, b in zip(flags, ends, lens, nbytes):
                writers["valid" if is_valid else "train"].add(flat[e - n : e], int(b))
            seen_bytes += int(nbytes.sum())
            show.update(sum(w.documents for w in writers.values()), seen_bytes,
                        sum(w.tokens for w in writers.values()))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    for w in writers.values():
        w.builder.finalize(str(out_dir / f"{w.prefix.name}.idx"))
    show.update(sum(w.documents for w in writers.values()), seen_bytes,
                sum(w.tokens for w in writers.values()), final=True)

    total = sum(w.documents for w in writers.values())
    if total == 0:
        raise ConfigError("the corpus is empty: no non-empty documents in the inputs")
    for name, w in writers.items():
        if w.documents == 0:
            hint = "raise --valid-fraction or give --valid-input" if name == "valid" else "lower --valid-fraction"
            raise ConfigError(f"the {name} split is empty ({total} documents in all); {hint}")
    splits = {
        name: {"documents": w.documents, "tokens": w.tokens, "bytes": w.bytes,
               "bytes_per_token": w.bytes / w.tokens, "prefix": name}
        for name, w in writers.items()
    }
    checksums = {f.name: sha256_file(f) for f in sorted(out_dir.iterdir()) if f.name != MANIFEST}
    manifest = {
        "format": "megatron-moe-dataset",
        "version": DATASET_VERSION,
        "documents": total,
        "tokens": sum(s["tokens"] for s in splits.values()),
        "bytes": sum(s["bytes"] for s in splits.values()),
        "bytes_per_token": sum(s["bytes"] for s in splits.values()) / sum(s["tokens"] for s in splits.values()),
        "skipped_empty_documents": stats["skipped_empty"],
        "eod_appended": True,
        "dtype": np.dtype(dtype).name,
        "tokenizer": tok_info,
        "split": {"method": "blake2b(document text, key=seed) < valid_fraction, unless from a --valid-input",
                  "valid_fraction": valid_fraction, "seed": split_seed},
        "splits": splits,
        "checksums": checksums,
        **extra,
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    # mkdtemp/mkstemp create owner-only files; a dataset is meant to be shared read-only.
    os.chmod(out_dir / MANIFEST, 0o644)
    os.chmod(out_dir, 0o755)
    return manifest


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished `tmp` directory onto `out` (replacing it only with `force`)."""
    if out.exists():
        if not force:
            raise ConfigError(f"output {str(out)!r} already exists; pass --force to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def prepare_dataset(
    inputs: list[str | Path],
    output: str | Path,
    *,
    tokenizer: str | Path | None = None,
    vocab_size: int = 8192,
    eod_token: str | None = None,
    text_key: str = "text",
    separator: str = EOD_TEXT,
    valid_fraction: float = 0.01,
    valid_inputs: list[str | Path] = (),
    split_seed: int = 0,
    workers: int = 1,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize text/JSONL files (or directories of them, optionally .xz/.gz/.bz2) into a prepared dataset.

    `tokenizer` None trains a byte-level BPE of `vocab_size` on the training documents; else a tokenizer file
    is loaded. Documents from `valid_inputs` all go to the validation split (and `valid_fraction` applies to
    `inputs` only if no `valid_inputs` are given). Writes into a temporary sibling directory and renames it
    into place, so a failure leaves nothing behind. Returns the manifest.
    """
    out = Path(output)
    if out.exists() and not force:
        raise ConfigError(f"output {str(out)!r} already exists; pass --force to replace it")
    if not 0 <= valid_fraction < 1:
        raise ConfigError(f"--valid-fraction {valid_fraction} must be in [0, 1)")
    if workers < 1:
        raise ConfigError(f"--workers {workers} must be >= 1")
    if not -(2**63) <= split_seed < 2**63:
        raise ConfigError(f"--split-seed {split_seed} must be a signed 64-bit integer, in [-2**63, 2**63 - 1]")
    files = expand_inputs(inputs)
    valid_files = expand_inputs(valid_inputs) if valid_inputs else []
    if valid_files:
        valid_fraction = 0.0

    def source() -> Iterator[tuple[Document, str | None]]:
        for f in files:
            for d in iter_documents(f, separator, text_key):
                yield d, ("train" if valid_files else None)
        for f in valid_files:
            for d in iter_documents(f, separator, text_key):
                yield d, "valid"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        extra = {"inputs": [{"path": str(f), "bytes": f.stat().st_size} for f in files],
                 "valid_inputs": [{"path": str(f), "bytes": f.stat().st_size} for f in valid_files]}
        manifest = write_dataset(
            source, tmp, tokenizer_file=tokenizer, vocab_size=vocab_size, eod_token=eod_token,
            valid_fraction=valid_fraction, split_seed=split_seed, workers=workers, progress=progress, extra=extra,
            label=f"prepare {out.name}",
        )
        _publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
