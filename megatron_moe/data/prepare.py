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
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_moe.config import ConfigError
from megatron_moe.data.inputs import Document, ReadMeter, expand_inputs, iter_documents
from megatron_moe.data.store import DATASET_VERSION, MANIFEST, sha256_file
from megatron_moe.data.tokenizers import EOD_TEXT, TextTokenizer, find_tokenizer_file, load_tokenizer, train_bpe_tokenizer
from megatron_moe.files import atomic_write_json


def text_split_value(text: str, split_seed: int) -> float:
    """Hash of a document's text mapped to [0, 1): documents below `valid_fraction` are held out."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=split_seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") / 2.0**64


class Progress:
    """Progress of one pass over the inputs, on stderr: a tqdm bar on a terminal (input bytes read of the total,
    rate, ETA), else a plain line every 10 s (the log of a batch job); a summary line at the end."""

    def __init__(self, label: str, total: int | None, enabled: bool = True, unit: str = "B") -> None:
        self.label, self.total, self.enabled, self.unit = label, total, enabled, unit
        self.start = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit=unit, unit_scale=True, file=sys.stderr, leave=False,
                            dynamic_ncols=True)
        elif enabled:  # a log sees the pass begin at once, then a line every 10 s
            print(f"{label}: started" + (f", {self._amount(total)} to read" if total else ""), file=sys.stderr,
                  flush=True)

    def _amount(self, n: float) -> str:
        """Bytes as MB, anything else as a whole count."""
        return f"{n / 1e6:,.1f} MB" if self.unit == "B" else f"{int(n):,} {self.unit}"

    def update(self, position: int, docs: int, tokens: int) -> None:
        """`position`: bytes of the total read so far."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"{docs:,} documents, {tokens:,} tokens", refresh=False)
            self.bar.update(position - self.bar.n)
            return
        now = time.perf_counter()
        if not self.enabled or now - self.last < 10.0:
            return
        self.last = now
        done = self._amount(position)
        if self.total:
            eta = (now - self.start) * (self.total - position) / max(position, 1)
            done = f"{100 * position / self.total:.0f}% ({done} of {self._amount(self.total)}), eta {eta:,.0f} s"
        counts = f"{docs:,} documents" + (f", {tokens:,} tokens" if tokens else "")
        print(f"{self.label}: {done}, {counts}", file=sys.stderr, flush=True)

    def close(self, docs: int, nbytes: int, tokens: int) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            mb, secs = nbytes / 1e6, time.perf_counter() - self.start
            counts = f"{docs:,} documents, {mb:,.1f} MB" + (f", {tokens:,} tokens" if tokens else "")
            print(f"{self.label}: {counts}, {mb / max(secs, 1e-9):.2f} MB/s", file=sys.stderr, flush=True)


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
    meter: ReadMeter | None = None,
) -> dict[str, Any]:
    """Tokenize `source` into `out_dir` (which must exist and be empty); returns the manifest. `meter`, when
    given, is what `source` reads through: progress is then shown against the inputs' total size."""
    stats = {"skipped_empty": 0}
    # Pass 1: the tokenizer (trained on training documents only, so nothing held out leaks into it).
    if tokenizer_file is None:
        def train_texts() -> Iterator[str]:
            reading = Progress(f"{label}: BPE training, reading", meter.total if meter else None, progress)
            docs = nbytes = 0
            for texts, flags in _chunks(source, valid_fraction, split_seed, {"skipped_empty": 0}):
                docs += len(texts)
                nbytes += sum(len(t.encode("utf-8")) for t in texts)
                reading.update(meter.position() if meter else nbytes, docs, 0)
                yield from (t for t, v in zip(texts, flags) if not v)
            reading.close(docs, nbytes, 0)

        tok: TextTokenizer = train_bpe_tokenizer(train_texts(), vocab_size, progress=progress)
        tok_name = "tokenizer.json"
        tok.tok.save(str(out_dir / tok_name))  # type: ignore[attr-defined]
        tok_info = {"trained": True, "source": None, "requested_vocab_size": vocab_size}
        tok_info.update(kind=tok.kind, file=tok_name, vocab_size=tok.vocab_size, eod_id=tok.eod_id,
                        eod_token=tok.eod_token, sha256=sha256_file(out_dir / tok_name))
    else:
        tok, tok_name, tok_info = copy_tokenizer(tokenizer_file, eod_token, out_dir)

    # Pass 2: encode and write. The first chunk is read before the builder import pulls in torch +
    # megatron-core (seconds), so that bad input near the start is refused at once.
    chunks = _chunks(source, valid_fraction, split_seed, stats)
    chunks = itertools.chain([next(chunks)], chunks)

    dtype = token_dtype(tok.vocab_size)
    writers = split_writers(out_dir, dtype)
    show = Progress(label, meter.total if meter else None, progress)
    seen_bytes = 0
    pool = None
    try:
        if workers > 1:
            import multiprocessing as mp

            # Fresh interpreters, not forks: a fork of a process with threads (torch's OpenMP pool, a progress bar's
            # monitor, a used tokenizer's thread pool) can deadlock in the child on a lock held at fork time. Each
            # worker loads the tokenizer from its file; it costs a fraction of a second per worker.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            ctx = mp.get_context("spawn")
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
            show.update(meter.position() if meter else seen_bytes, sum(w.documents for w in writers.values()),
                        sum(w.tokens for w in writers.values()))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    for w in writers.values():
        w.builder.finalize(str(out_dir / f"{w.prefix.name}.idx"))
    show.close(sum(w.documents for w in writers.values()), seen_bytes, sum(w.tokens for w in writers.values()))
    split = {"method": "blake2b(document text, key=seed) < valid_fraction, unless from a --valid-input",
             "valid_fraction": valid_fraction, "seed": split_seed}
    return finish_dataset(out_dir, writers, dtype, tok_info, split, {"skipped_empty_documents": stats["skipped_empty"],
                                                                     **extra})


def copy_tokenizer(name: str | Path, eod_token: str | None, out_dir: Path) -> tuple[TextTokenizer, str, dict]:
    """Load tokenizer `name` (file, directory or Hub name) and copy its file into a dataset directory."""
    src = find_tokenizer_file(name)
    tok = load_tokenizer(src, eod_token)
    tok_name = {"hf": "tokenizer.json", "sentencepiece": "tokenizer.model", "tiktoken": "tokenizer.tiktoken"}[tok.kind]
    shutil.copyfile(src, out_dir / tok_name)
    tok_info = {"trained": False, "source": str(src), "kind": tok.kind, "file": tok_name,
                "vocab_size": tok.vocab_size, "eod_id": tok.eod_id, "eod_token": tok.eod_token,
                "sha256": sha256_file(out_dir / tok_name)}
    return tok, tok_name, tok_info


def _indexed_dataset() -> Any:
    """megatron-core's indexed-dataset module (its import warns about optional packages: not ours to show)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int) -> Any:
    """The smallest dtype megatron-core stores token ids of this vocabulary in."""
    return _indexed_dataset().DType.optimal_dtype(vocab_size)


def split_writers(out_dir: Path, dtype: Any) -> dict[str, _SplitWriter]:
    IndexedDatasetBuilder = _indexed_dataset().IndexedDatasetBuilder
    return {name: _SplitWriter(IndexedDatasetBuilder(str(out_dir / f"{name}.bin"), dtype=dtype), out_dir / name)
            for name in ("train", "valid")}


def finish_dataset(out_dir: Path, writers: dict[str, _SplitWriter], dtype: Any, tok_info: dict, split: dict,
                   extra: dict[str, Any]) -> dict[str, Any]:
    """Check the finalized splits and write the manifest (checksums of every file); returns it."""
    total = sum(w.documents for w in writers.values())
    if total == 0:
        raise ConfigError("the corpus is empty: no non-empty documents in the inputs")
    for name, w in writers.items():
        if w.documents == 0:
            hint = ("raise --valid-fraction or give --valid-input" if name == "valid" else "lower --valid-fraction")
            if total < 10:  # a document separator that never matched, most likely
                hint = ("check how documents are split: --separator, or --line-documents for one document per "
                        "line")
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
        "eod_appended": True,
        "dtype": np.dtype(dtype).name,
        "tokenizer": tok_info,
        "split": split,
        "splits": splits,
        "checksums": checksums,
        **extra,
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    # mkdtemp/mkstemp create owner-only files; a dataset is meant to be shared read-only.
    os.chmod(out_dir / MANIFEST, 0o644)
    os.chmod(out_dir, 0o755)
    return manifest


def temp_dir_for(out: Path) -> Path:
    """A fresh hidden directory beside `out` to build it in. Its name carries this host and process id, so that
    the leftovers of a killed build of the same output on this host (whose process is gone) are recognised and
    removed; builds on other hosts sharing the directory are left alone."""
    host = socket.gethostname().replace("-", "_")
    for old in out.parent.glob(f".{out.name}.tmp-{host}-*"):
        pid = old.name.removeprefix(f".{out.name}.tmp-{host}-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{host}-{os.getpid()}-", dir=out.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def publish(tmp: Path, out: Path, force: bool) -> None:
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
    line_documents: bool = False,
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
    meter = ReadMeter(files + valid_files)
    if valid_files:
        valid_fraction = 0.0

    def source() -> Iterator[tuple[Document, str | None]]:
        meter.done = 0
        for f in files:
            for d in iter_documents(f, separator, text_key, line_documents, meter):
                yield d, ("train" if valid_files else None)
        for f in valid_files:
            for d in iter_documents(f, separator, text_key, line_documents, meter):
                yield d, "valid"

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = temp_dir_for(out)
    except OSError as exc:  # named by the directory it is made in, not by the random name it would have had
        raise OSError(exc.errno, exc.strerror, str(out.parent)) from None
    try:
        extra = {"inputs": [{"path": str(f), "bytes": f.stat().st_size} for f in files],
                 "valid_inputs": [{"path": str(f), "bytes": f.stat().st_size} for f in valid_files]}
        manifest = write_dataset(
            source, tmp, tokenizer_file=tokenizer, vocab_size=vocab_size, eod_token=eod_token,
            valid_fraction=valid_fraction, split_seed=split_seed, workers=workers, progress=progress, extra=extra,
            label=f"prepare {out.name}", meter=meter,
        )
        publish(tmp, out, force)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write (a full disk) names no file
            raise OSError(exc.errno, exc.strerror, str(out)) from None
        raise
    return manifest
