"""Data layer: preprocessing to megatron-core `.bin`/`.idx`, data-reuse schedules, and the trainer's source.

A *prepared dataset* is a directory written by `megatron-moe data prepare` (or `prepare_dataset`)::

    manifest.json            documents, tokens, bytes, tokenizer hash, output checksums, bytes per token
    tokenizer.json           the tokenizer (or tokenizer.model / tokenizer.tiktoken)
    train.bin, train.idx     megatron-core IndexedDataset, one sequence per document, EOD token appended
    valid.bin, valid.idx     held-out documents (same format)

The train/validation split is per document and decided by a hash of the document's *text* (not its tokens), so
arms with different tokenizers still hold out the same documents.

*Schedule.* From the training documents, `unique_tokens` selects whole documents in a seeded order (a fixed
hash order, so a smaller budget is a subset of a larger one) until the budget would be exceeded. Each epoch is
a fresh seeded shuffle of those documents; the documents of epoch 0, then epoch 1, ... are concatenated into
one token stream, which simply continues across epoch boundaries (the tail of one epoch and the head of the
next can share a sample; nothing is dropped or padded). Sample `i` is stream tokens
`[i * seq_length, i * seq_length + seq_length + 1)`: consecutive samples overlap by one token, so every stream
token is a prediction target exactly once (megatron-core's convention). With `epochs = R` the stream holds
`floor(R * unique_tokens)` tokens, so the samples cover exactly that many tokens to within one sequence;
optimizer step `s` takes samples `[s * global_batch, (s + 1) * global_batch)` and a last partial batch is
dropped. The stream depends only on the dataset, the schedule fields, seq_length, global batch and the data
seed, never on the model. Shuffles use a counter-based hash (splitmix64) + stable argsort, so they do not
depend on numpy's random-stream versioning.

Heavy imports (torch via megatron-core's builder, `tokenizers`) happen inside functions.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import itertools
import json
import lzma
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_moe.config import ConfigError, DataConfig
from megatron_moe.utils import atomic_write_json

EOD_TEXT = "<|endoftext|>"
"""Default end-of-document token text (also the default document separator of plain-text inputs)."""
DATASET_VERSION = 1
SYNTHETIC_VERSION = 1
STREAM_VERSION = 1  # bump when the sample-stream algorithm changes: it is part of every fingerprint
MANIFEST = "manifest.json"
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
VERIFY_MAX_BYTES = 1 << 30  # checksums are verified on load for datasets up to this size (bytes)

# ================================================================ hashing helpers

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser on uint64 (wrapping arithmetic is intended)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _seeded_order(ids: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """`ids` sorted by a hash of (seed, stream, id): a platform- and numpy-version-independent shuffle."""
    digest = hashlib.blake2b(f"{seed}:{stream}".encode(), digest_size=8).digest()
    h = _splitmix64(ids.astype(np.uint64) ^ np.uint64(int.from_bytes(digest, "little")))
    return ids[np.argsort(h, kind="stable")]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _text_split_value(text: str, split_seed: int) -> float:
    """Hash of a document's text mapped to [0, 1): documents below `valid_fraction` are held out."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=split_seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") / 2.0**64


# ================================================================ tokenizers


class TextTokenizer:
    """A loaded tokenizer: HF `tokenizers` JSON, SentencePiece model, or tiktoken BPE file."""

    kind: str
    vocab_size: int
    eod_id: int
    eod_token: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError


class HFTokenizer(TextTokenizer):
    kind = "hf"

    def __init__(self, tok: Any, eod_token: str | None) -> None:
        self.tok = tok
        # Special-token text inside a document (say a literal "<|endoftext|>" in a JSON field) is encoded as
        # ordinary text, so the EOD id only ever marks a document end.
        tok.encode_special_tokens = True
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        candidates = [eod_token] if eod_token else [EOD_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>"]
        for cand in candidates:
            tid = tok.token_to_id(cand)
            if tid is not None:
                self.eod_id, self.eod_token = tid, cand
                return
        raise ConfigError(
            f"tokenizer has no end-of-document token (tried {', '.join(candidates)}); pass --eod-token"
        )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we do not use.
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer(TextTokenizer):
    kind = "sentencepiece"

    def __init__(self, sp: Any, eod_token: str | None) -> None:
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        tid = sp.piece_to_id(eod_token) if eod_token else sp.eos_id()
        if tid is None or tid < 0 or (eod_token and sp.id_to_piece(tid) != eod_token):
            raise ConfigError("SentencePiece model has no end-of-document (eos) token; pass --eod-token")
        self.eod_id, self.eod_token = int(tid), sp.id_to_piece(int(tid))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        # SentencePiece drops control pieces when decoding; splice the EOD text back in by hand.
        out, cur = [], []
        for i in ids:
            if int(i) == self.eod_id:
                out += [self.sp.decode(cur), self.eod_token]
                cur = []
            else:
                cur.append(int(i))
        return "".join(out + [self.sp.decode(cur)])


# The GPT-4 (cl100k) pre-tokenisation pattern, used for tiktoken files, which do not carry their own.
_TIKTOKEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)


class TiktokenTokenizer(TextTokenizer):
    kind = "tiktoken"

    def __init__(self, path: Path, eod_token: str | None) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(path))
        self.eod_token = eod_token or EOD_TEXT
        self.eod_id = max(ranks.values()) + 1
        self.enc = tiktoken.Encoding(
            name=path.stem, pat_str=_TIKTOKEN_PATTERN, mergeable_ranks=ranks,
            special_tokens={self.eod_token: self.eod_id},
        )
        self.vocab_size = self.enc.n_vocab

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode([int(i) for i in ids])


def tokenizer_kind(path: Path) -> str:
    """Which loader a tokenizer file needs, from its name."""
    if path.is_dir():
        return "hf"
    name = path.name.lower()
    if name.endswith(".model"):
        return "sentencepiece"
    if name.endswith(".tiktoken"):
        return "tiktoken"
    return "hf"


def load_tokenizer(path: str | Path, eod_token: str | None = None) -> TextTokenizer:
    """Load a tokenizer file (tokenizer.json or a directory holding one, *.model, *.tiktoken)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"tokenizer file {str(path)!r} does not exist")
    kind = tokenizer_kind(path)
    try:
        if kind == "sentencepiece":
            try:
                import sentencepiece
            except ImportError:
                raise ConfigError("a SentencePiece tokenizer needs `pip install sentencepiece`") from None
            return SentencePieceTokenizer(sentencepiece.SentencePieceProcessor(model_file=str(path)), eod_token)
        if kind == "tiktoken":
            try:
                import tiktoken  # noqa: F401
            except ImportError:
                raise ConfigError("a tiktoken tokenizer needs `pip install tiktoken`") from None
            return TiktokenTokenizer(path, eod_token)
        from tokenizers import Tokenizer

        return HFTokenizer(Tokenizer.from_file(str(path)), eod_token)
    except ConfigError:
        raise
    except Exception as exc:  # each library raises its own types for a bad file
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"tokenizer file {str(path)!r} does not load ({msg})") from None


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE (lossless: decode(encode(x)) == x) with `<|endoftext|>` as token 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ConfigError(f"vocab size {vocab_size} is too small for byte-level BPE; use >= 258")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOD_TEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok, EOD_TEXT)


# ================================================================ reading inputs


@dataclass
class Document:
    text: str
    where: str  # "file:line" for error messages


def _open_binary(path: Path) -> Any:
    opener = COMPRESSED.get(path.suffix.lower())
    return opener(path, "rb") if opener else open(path, "rb")


def _base_suffix(path: Path) -> str:
    """Suffix ignoring a compression suffix: corpus.jsonl.xz -> .jsonl."""
    name = path.name.lower()
    for comp in COMPRESSED:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return Path(name).suffix


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Input files: files as given, directories expanded to their text/JSONL files (sorted, recursive)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
                and _base_suffix(f) in TEXT_SUFFIXES + JSONL_SUFFIXES
            )
            if not found:
                raise ConfigError(f"input directory {str(p)!r} has no .txt or .jsonl files (optionally .xz/.gz/.bz2)")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"input {str(p)!r} does not exist")
    if not files:
        raise ConfigError("no input files given")
    return files


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) with strict UTF-8 and one-line errors."""
    try:
        with _open_binary(path) as f:
            for n, raw in enumerate(f, 1):
                try:
                    yield n, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ConfigError(f"{path}:{n}: not UTF-8 text (byte {exc.start} of the line)") from None
    except (lzma.LZMAError, zlib.error, OSError, EOFError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None


def iter_documents(path: Path, separator: str = EOD_TEXT, text_key: str = "text") -> Iterator[Document]:
    """Documents of one file: JSON lines (field `text_key`) or plain text split on `separator`.

    Plain-text documents are stripped of surrounding whitespace; empty documents are yielded (as "") so that
    the caller can count them, and are not written.
    """
    if _base_suffix(path) in JSONL_SUFFIXES:
        for n, line in _lines(path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or text_key not in obj:
                raise ConfigError(f"{path}:{n}: JSON line has no field {text_key!r}")
            if not isinstance(obj[text_key], str):
                raise ConfigError(f"{path}:{n}: field {text_key!r} is not a string")
            yield Document(obj[text_key], f"{path}:{n}")
        return
    parts: list[str] = []
    start = 1
    for n, line in _lines(path):
        if separator and separator in line:
            pieces = line.split(separator)
            parts.append(pieces[0])
            for piece in pieces[1:]:
                yield Document("".join(parts).strip(), f"{path}:{start}")
                parts, start = [piece], n
        else:
            parts.append(line)
    last = "".join(parts).strip()
    if last:  # text after the final separator is usually just a newline: not a document
        yield Document(last, f"{path}:{start}")


# ================================================================ prepared-dataset files


@dataclass
class TokenStore:
    """Tokens of one split, read from megatron-core `.bin`/`.idx` with numpy (no torch needed)."""

    tokens: np.ndarray  # memory-mapped, whole .bin
    doc_start: np.ndarray  # int64 token offset of each document
    doc_len: np.ndarray  # int64 tokens of each document

    @property
    def num_documents(self) -> int:
        return len(self.doc_len)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_len.sum())

    def document(self, i: int) -> np.ndarray:
        s = int(self.doc_start[i])
        return self.tokens[s : s + int(self.doc_len[i])]

    @classmethod
    def open(cls, prefix: Path) -> "TokenStore":
        """Open and structurally check `prefix.idx`/`prefix.bin`; raises ConfigError when corrupt or truncated."""
        idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for p in (idx, bin_):
            if not p.is_file():
                raise ConfigError(f"dataset file {str(p)!r} is missing")
        raw = idx.read_bytes()
        bad = f"index {str(idx)!r} is corrupt or truncated"
        if len(raw) < 34 or raw[:9] != b"MMIDIDX\x00\x00":
            raise ConfigError(f"{bad} (bad header)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", raw[9:34])
        dtypes = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                  8: np.uint16}
        if version != 1 or code not in dtypes or dtypes[code] in (np.float32, np.float64):
            raise ConfigError(f"{bad} (version {version}, dtype code {code})")
        if len(raw) != 34 + 12 * n_seq + 8 * n_doc:
            raise ConfigError(f"{bad} (size {len(raw)} bytes does not match {n_seq} sequences, {n_doc - 1} documents)")
        dtype = np.dtype(dtypes[code])
        seq_len = np.frombuffer(raw, np.int32, n_seq, 34).astype(np.int64)
        seq_ptr = np.frombuffer(raw, np.int64, n_seq, 34 + 4 * n_seq)
        doc_idx = np.frombuffer(raw, np.int64, n_doc, 34 + 12 * n_seq)
        offsets = np.concatenate([[0], np.cumsum(seq_len)])
        if (
            n_doc < 2 or doc_idx[0] != 0 or doc_idx[-1] != n_seq or np.any(np.diff(doc_idx) < 0)
            or np.any(seq_len < 0) or not np.array_equal(seq_ptr, offsets[:-1] * dtype.itemsize)
        ):
            raise ConfigError(f"{bad} (inconsistent sequence or document tables)")
        if bin_.stat().st_size != offsets[-1] * dtype.itemsize:
            raise ConfigError(
                f"data file {str(bin_)!r} is corrupt or truncated ({bin_.stat().st_size} bytes, the index says "
                f"{offsets[-1] * dtype.itemsize})"
            )
        tokens = np.memmap(bin_, dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype)
        return cls(tokens, offsets[doc_idx[:-1]], offsets[doc_idx[1:]] - offsets[doc_idx[:-1]])


_MANIFEST_FIELDS: list[tuple[tuple[str, ...], type]] = [
    *((("splits", split, key), kind) for split in ("train", "valid") for key, kind in
      (("prefix", str), ("documents", int), ("tokens", int), ("bytes_per_token", float))),
    *((("tokenizer", key), kind) for key, kind in
      (("kind", str), ("file", str), ("vocab_size", int), ("eod_id", int), ("eod_token", str), ("sha256", str))),
    (("checksums",), dict), (("checksums", "train.bin"), str), (("checksums", "train.idx"), str),
]
"""(key path, type) of every manifest field the loader reads."""


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset directory; ConfigError when it is not one, or is incomplete, or a file
    it lists is missing."""
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise ConfigError(f"data.path = {str(path)!r} is not a directory (prepare one with `megatron-moe data prepare`)")
    if not mf.is_file():
        raise ConfigError(f"{str(path)!r} has no {MANIFEST}; is it a dataset made by `megatron-moe data prepare`?")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{mf}: not valid JSON ({exc})") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != "megatron-moe-dataset"
            or manifest.get("version") != DATASET_VERSION):
        raise ConfigError(f"{mf}: not a megatron-moe dataset manifest of version {DATASET_VERSION}")
    for keys, kind in _MANIFEST_FIELDS:
        node = manifest
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, kind) or isinstance(node, bool):
            raise ConfigError(f"{mf}: incomplete manifest ({'.'.join(keys)} is missing or not of type {kind.__name__})")
    for name, digest in manifest["checksums"].items():
        if not isinstance(digest, str):
            raise ConfigError(f"{mf}: incomplete manifest (checksums.{name} is not a str)")
        if not (path / name).is_file():
            raise ConfigError(f"dataset file {str(path / name)!r} is missing")
    return manifest


def verify_dataset(path: str | Path, manifest: dict[str, Any] | None = None) -> None:
    """Compare the checksums of every output file with the manifest; ConfigError on mismatch."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    for name, digest in manifest["checksums"].items():
        f = path / name
        if _sha256_file(f) != digest:
            raise ConfigError(f"dataset file {str(f)!r} is corrupt (sha256 differs from {MANIFEST})")


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
        flags.append(forced == "valid" if forced else _text_split_value(doc.text, split_seed) < valid_fraction)
        size += len(doc.text)
        produced += 1
        if size >= chunk_bytes:
            yield texts, flags
            texts, flags, size = [], [], 0
    if not produced:  # refuse early, before a tokenizer is trained or torch is imported
        raise ConfigError("the corpus is empty: no non-empty documents in the inputs")
    if texts:
        yield texts, flags


def _write_dataset(
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
                    eod_token=tok.eod_token, sha256=_sha256_file(out_dir / tok_name))

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
    checksums = {f.name: _sha256_file(f) for f in sorted(out_dir.iterdir()) if f.name != MANIFEST}
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
        manifest = _write_dataset(
            source, tmp, tokenizer_file=tokenizer, vocab_size=vocab_size, eod_token=eod_token,
            valid_fraction=valid_fraction, split_seed=split_seed, workers=workers, progress=progress, extra=extra,
            label=f"prepare {out.name}",
        )
        _publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ================================================================ the built-in synthetic corpus

_NAMES = [("Lily", "she"), ("Tom", "he"), ("Ben", "he"), ("Mia", "she"), ("Sam", "he"), ("Anna", "she"),
          ("Max", "he"), ("Lucy", "she"), ("Tim", "he"), ("Sue", "she"), ("Jack", "he"), ("Emma", "she"),
          ("Leo", "he"), ("Zoe", "she"), ("Finn", "he"), ("Ella", "she")]
_ANIMALS = ["cat", "dog", "bird", "frog", "rabbit", "duck", "bear", "fox", "mouse", "pig", "lion", "owl"]
_OBJECTS = ["ball", "kite", "box", "hat", "cake", "book", "car", "boat", "apple", "flower", "key", "drum",
            "shell", "cup", "toy", "stick"]
_ADJS = ["red", "blue", "green", "yellow", "big", "small", "shiny", "soft", "old", "new", "pretty", "funny"]
_PLACES = ["park", "garden", "forest", "house", "beach", "farm", "school", "town", "field", "hill"]
_SPOTS = ["tree", "rock", "pond", "bench", "door", "fence", "river", "bush"]
_FEELINGS = ["happy", "sad", "scared", "excited", "tired", "proud", "surprised", "angry"]
_WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy"]
_FOODS = ["soup", "bread", "cookies", "milk", "pie", "fruit"]


def synthetic_story(index: int) -> str:
    """Story number `index` of the synthetic corpus: templated, with names and objects that recur within it."""
    r = random.Random(SYNTHETIC_VERSION * 1_000_003 + index)
    (a, pa), (b, pb) = r.sample(_NAMES, 2)
    animal, obj, adj, place, spot = (r.choice(x) for x in (_ANIMALS, _OBJECTS, _ADJS, _PLACES, _SPOTS))
    feel, feel2, weather, food = r.choice(_FEELINGS), r.choice(_FEELINGS), r.choice(_WEATHER), r.choice(_FOODS)
    cap = str.capitalize
    opening = r.choice([
        f"Once upon a time, there was a little {animal} named {a}.",
        f"One {weather} day, a {animal} named {a} went to the {place}.",
        f"{a} was a {adj} {animal} who lived near the {place}.",
    ])
    s = [opening, f"{cap(pa)} had a friend named {b}."]
    s.append(r.choice([
        f"One day, {a} found a {adj} {obj} under the {spot}.",
        f"{a} saw a {adj} {obj} next to the {spot}.",
        f"In the {place}, {a} found a {adj} {obj}.",
    ]))
    s.append(r.choice([
        f'"{b}, look at my {obj}!" said {a}.',
        f"{a} showed the {obj} to {b}.",
        f'"What a {adj} {obj}!" said {b}.',
    ]))
    s.append(f"{b} was {feel}.")
    for _ in range(r.randint(1, 3)):
        s.append(r.choice([
            f"They played with the {obj} by the {spot}.",
            f"{a} and {b} ran to the {spot} with the {obj}.",
            f"{cap(pb)} wanted to hold the {obj} too.",
            f"{a} gave the {obj} to {b}, and {pb} smiled.",
            f"Then the {obj} fell into the {spot}, and {a} was {feel2}.",
            f"They ate {food} in the {place} and talked about the {obj}.",
        ]))
    s.append(r.choice([
        f"At the end of the day, {a} and {b} went home. {cap(pa)} was {feel2}.",
        f"From that day on, {a} and {b} shared the {obj}.",
        f"{a} learned that it is good to share. The end.",
        f"{b} said, \"Thank you, {a}.\" They were friends forever.",
    ]))
    return " ".join(s)


def synthetic_documents(num_documents: int) -> list[str]:
    """The synthetic corpus: `synthetic_story(i)` for i < num_documents."""
    return [synthetic_story(i) for i in range(num_documents)]


SYNTHETIC_VALID_FRACTION = 0.1


def cache_root() -> Path:
    """Cache directory: $MEGATRON_MOE_CACHE, else ~/.cache/megatron_moe (a temp dir if home is read-only)."""
    if env := os.environ.get("MEGATRON_MOE_CACHE"):
        return Path(env)
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megatron_moe"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"megatron_moe-cache-{os.getuid()}"


def synthetic_dataset(num_documents: int = 2000, vocab_size: int = 512, root: Path | None = None) -> Path:
    """Build (once, cached atomically) and return the prepared synthetic dataset directory.

    The corpus is `num_documents` tiny templated English stories (16 names, a few dozen nouns, verbs and
    adjectives; names and objects recur within a story, so a small model's loss falls quickly), split
    90/10 by text hash, with a byte-level BPE of `vocab_size` trained on the training stories. The same
    arguments give the same bytes on every machine; concurrent builders (ranks) race harmlessly.
    """
    root = Path(root) if root else cache_root()
    out = root / f"synthetic-v{SYNTHETIC_VERSION}-docs{num_documents}-vocab{vocab_size}"
    if (out / MANIFEST).is_file():
        return out
    docs = synthetic_documents(num_documents)
    if not any(_text_split_value(t, 0) < SYNTHETIC_VALID_FRACTION for t in docs):
        first = next(i for i in itertools.count(num_documents)
                     if _text_split_value(synthetic_story(i), 0) < SYNTHETIC_VALID_FRACTION)
        raise ConfigError(f"data.synthetic_documents = {num_documents} leaves the synthetic corpus no validation "
                          f"documents; use >= {first + 1}")
    root.mkdir(parents=True, exist_ok=True)

    def source() -> Iterator[tuple[Document, str | None]]:
        return ((Document(t, f"synthetic:{i}"), None) for i, t in enumerate(docs))

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=root))
    try:
        _write_dataset(
            source, tmp, tokenizer_file=None, vocab_size=vocab_size, eod_token=None,
            valid_fraction=SYNTHETIC_VALID_FRACTION, split_seed=0, workers=1, progress=False,
            extra={"inputs": [{"path": f"synthetic:v{SYNTHETIC_VERSION}", "documents": num_documents}],
                   "valid_inputs": []},
        )
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / MANIFEST).is_file():  # lost a race to another builder: theirs is identical
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ================================================================ schedules


class Schedule:
    """The data-reuse schedule over training documents (see the module docstring); pure numpy, no I/O."""

    def __init__(
        self,
        doc_len: np.ndarray,
        seq_length: int,
        seed: int,
        unique_tokens: int = 0,
        epochs: float = 0.0,
        consumed_tokens: int = 0,
    ) -> None:
        if seq_length <= 0:
            raise ConfigError(f"seq_length = {seq_length} must be > 0")
        self.doc_len = np.asarray(doc_len, np.int64)
        self.seq_length = seq_length
        self.seed = seed
        available = int(self.doc_len.sum())
        # Budget: whole documents in a fixed seeded order while the running total stays within the budget.
        order = _seeded_order(np.arange(len(self.doc_len), dtype=np.int64), seed, 0)
        if unique_tokens:
            if unique_tokens > available:
                raise ConfigError(
                    f"data.unique_tokens = {unique_tokens:,} exceeds the {available:,} training tokens of the dataset"
                )
            take = int(np.searchsorted(np.cumsum(self.doc_len[order]), unique_tokens, side="right"))
            if take == 0:
                raise ConfigError(
                    f"data.unique_tokens = {unique_tokens:,} is smaller than the first selected document "
                    f"({int(self.doc_len[order[0]]):,} tokens)"
                )
            order = order[:take]
        self.selected = np.sort(order)  # document ids in use (sorted: the epoch shuffles define the order)
        self.unique_tokens = int(self.doc_len[self.selected].sum())
        if epochs:
            self.total_tokens: int | None = int(np.floor(epochs * self.unique_tokens))
        elif consumed_tokens:
            self.total_tokens = consumed_tokens
        else:
            self.total_tokens = None
        if self.total_tokens is not None and self.total_tokens < seq_length + 1:
            raise ConfigError(
                f"the data schedule provides {self.total_tokens:,} tokens, less than one sample of "
                f"seq_length + 1 = {seq_length + 1}"
            )
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def num_samples(self) -> int | None:
        """Samples in the stream (None = unbounded)."""
        return None if self.total_tokens is None else (self.total_tokens - 1) // self.seq_length

    @property
    def epochs(self) -> float | None:
        return None if self.total_tokens is None else self.total_tokens / self.unique_tokens

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document ids of `epoch` in order, token offsets of their starts + the end) — cached, 2 epochs."""
        if epoch not in self._epochs:
            ids = _seeded_order(self.selected, self.seed, epoch + 1)
            starts = np.concatenate([[0], np.cumsum(self.doc_len[ids])])
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (ids, starts)
        return self._epochs[epoch]

    def segments(self, start: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(document id, offset in document, tokens) pieces covering stream tokens [start, start + length)."""
        if self.total_tokens is not None and start + length > self.total_tokens:
            raise ConfigError(
                f"the data schedule has {self.total_tokens:,} tokens; asked for tokens up to {start + length:,}"
            )
        pos, end = start, start + length
        while pos < end:
            epoch, q = divmod(pos, self.unique_tokens)
            ids, starts = self.epoch_order(epoch)
            k = int(np.searchsorted(starts, q, side="right")) - 1
            while pos < end and k < len(ids):
                off = q - int(starts[k])
                n = min(int(starts[k + 1]) - int(starts[k]) - off, end - pos)
                yield int(ids[k]), off, n
                pos, q, k = pos + n, q + n, k + 1


def _read_segments(store: TokenStore, segments: Iterable[tuple[int, int, int]], length: int) -> np.ndarray:
    out = np.empty(length, np.int64)
    filled = 0
    for doc, off, n in segments:
        s = int(store.doc_start[doc]) + off
        out[filled : filled + n] = store.tokens[s : s + n]
        filled += n
    assert filled == length
    return out


def _samples(stream: np.ndarray, count: int, seq_length: int) -> np.ndarray:
    """`count` samples of seq_length + 1 tokens from a stream, consecutive samples sharing one token."""
    idx = np.arange(count)[:, None] * seq_length + np.arange(seq_length + 1)[None, :]
    return stream[idx]


# ================================================================ the trainer's interface


class DataSource:
    """Training batches by step, fixed validation batches, and a fingerprint of the sample stream."""

    def __init__(
        self, path: Path, cfg: DataConfig, seq_length: int, global_batch_size: int, *, synthetic: bool = False
    ) -> None:
        if global_batch_size <= 0:
            raise ConfigError(f"global_batch_size = {global_batch_size} must be > 0")
        self.path, self.cfg, self.synthetic = path, cfg, synthetic
        self.seq_length, self.global_batch_size = seq_length, global_batch_size
        self.manifest = read_manifest(path)
        self.train = TokenStore.open(path / self.manifest["splits"]["train"]["prefix"])
        self.valid = TokenStore.open(path / self.manifest["splits"]["valid"]["prefix"])
        for name, store in (("train", self.train), ("valid", self.valid)):
            want = self.manifest["splits"][name]
            if store.num_documents != want["documents"] or store.num_tokens != want["tokens"]:
                raise ConfigError(f"{path}: the {name} split does not match {MANIFEST} (documents or tokens differ)")
        size = sum((path / n).stat().st_size for n in self.manifest["checksums"])
        if size <= VERIFY_MAX_BYTES:  # cheap for small data; large data is checked by `data inspect --verify`
            verify_dataset(path, self.manifest)
        tok = self.manifest["tokenizer"]
        self.vocab_size: int = int(tok["vocab_size"])
        self.eod_id: int = int(tok["eod_id"])
        self.bytes_per_token: float = float(self.manifest["splits"]["valid"]["bytes_per_token"])
        self.schedule = Schedule(self.train.doc_len, seq_length, cfg.seed, cfg.unique_tokens, cfg.epochs,
                                 cfg.consumed_tokens)
        self._tokenizer: TextTokenizer | None = None
        self._fingerprint: str | None = None
        self.train_steps: int | None = None  # the run's length, if known: describe() reports its consumption

    @property
    def num_steps(self) -> int | None:
        """Optimizer steps the schedule provides (None = unbounded); a last partial batch is dropped."""
        n = self.schedule.num_samples
        return None if n is None else n // self.global_batch_size

    def train_batch(self, step: int) -> np.ndarray:
        """int64 [global_batch_size, seq_length + 1] for 0-based optimizer `step`; identical on every rank."""
        if step < 0 or (self.num_steps is not None and step >= self.num_steps):
            raise ConfigError(f"data schedule provides {self.num_steps} optimizer steps; step {step} asked")
        return self.samples(step * self.global_batch_size, self.global_batch_size)

    def samples(self, first: int, count: int) -> np.ndarray:
        """Training samples [first, first + count) as int64 [count, seq_length + 1]."""
        s = self.seq_length
        length = count * s + 1
        stream = _read_segments(self.train, self.schedule.segments(first * s, length), length)
        return _samples(stream, count, s)

    def check_valid_size(self, batch_size: int, num_batches: int) -> None:
        """ConfigError when the validation split is too small for `valid_batches(batch_size, num_batches)`."""
        s = self.seq_length
        need = batch_size * num_batches * s + 1
        if need > self.valid.num_tokens:
            raise ConfigError(
                f"validation split has {self.valid.num_tokens:,} tokens; {num_batches} batches of {batch_size} x "
                f"{s + 1} need {need:,} (lower train.eval_iters or "
                f"{'raise data.synthetic_documents' if self.synthetic else 'hold out more documents'})"
            )

    def valid_batches(self, batch_size: int, num_batches: int) -> list[np.ndarray]:
        """The first batch_size x num_batches held-out samples (validation documents in stored order)."""
        self.check_valid_size(batch_size, num_batches)
        s, count = self.seq_length, batch_size * num_batches
        need = count * s + 1
        stream = np.asarray(self.valid.tokens[:need], np.int64)  # one sequence per document, stored in order
        all_samples = _samples(stream, count, s)
        return [all_samples[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the sample stream: dataset checksums, schedule, counts and the first samples."""
        if self._fingerprint is None:
            sch = self.schedule
            h = hashlib.sha256()
            h.update(json.dumps({
                "stream_version": STREAM_VERSION,
                "train": [self.manifest["checksums"][f"train.{ext}"] for ext in ("bin", "idx")],
                "seq_length": self.seq_length, "global_batch_size": self.global_batch_size,
                "seed": self.cfg.seed, "unique_tokens": sch.unique_tokens, "total_tokens": sch.total_tokens,
                "num_steps": self.num_steps,
            }, sort_keys=True).encode())
            h.update(sch.selected.tobytes())
            n = sch.num_samples
            head = 64 if n is None else min(64, n)
            h.update(self.samples(0, head).tobytes())
            if n is not None:
                h.update(self.samples(n - 1, 1).tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def describe(self, train_steps: int | None = None) -> dict[str, Any]:
        """Documents, unique tokens (budget actually used), consumed tokens, epochs, fingerprint and so on.

        Consumed tokens and epochs are those of a run of `train_steps` (default: the run's length given to
        `build_data_source`, else the whole schedule); `schedule_tokens` is what the schedule provides.
        """
        sch = self.schedule
        train_steps = train_steps if train_steps is not None else self.train_steps
        steps = train_steps if train_steps is not None else self.num_steps
        consumed = None if steps is None else steps * self.global_batch_size * self.seq_length
        return {
            "source": "synthetic" if self.synthetic else str(self.path),
            "dataset_dir": str(self.path),
            "tokenizer": {k: self.manifest["tokenizer"][k] for k in ("kind", "vocab_size", "eod_id", "sha256")},
            "vocab_size": self.vocab_size,
            "train_documents": self.train.num_documents,
            "train_tokens": self.train.num_tokens,
            "valid_documents": self.valid.num_documents,
            "valid_tokens": self.valid.num_tokens,
            "bytes_per_token": self.bytes_per_token,
            "seed": self.cfg.seed,
            "seq_length": self.seq_length,
            "global_batch_size": self.global_batch_size,
            "unique_documents": int(len(sch.selected)),
            "unique_tokens": sch.unique_tokens,
            "unique_tokens_requested": self.cfg.unique_tokens,
            "schedule_tokens": sch.total_tokens,
            "schedule_samples": sch.num_samples,
            "num_steps": self.num_steps,
            "consumed_tokens": consumed,
            "epochs": None if consumed is None else consumed / sch.unique_tokens,
            "fingerprint": self.fingerprint(),
        }

    @property
    def tokenizer(self) -> TextTokenizer:
        """The dataset's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            tok = self.manifest["tokenizer"]
            self._tokenizer = load_tokenizer(self.path / tok["file"], tok["eod_token"])
        return self._tokenizer

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(ids)


def build_data_source(
    cfg: DataConfig, seq_length: int, global_batch_size: int, train_steps: int | None = None
) -> DataSource:
    """The trainer's data: `cfg.path` (a prepared dataset) or, when empty, the built-in synthetic corpus.

    With `train_steps`, a finite schedule that cannot feed that many steps is refused here, at start-up.
    """
    cfg.validate()
    if cfg.path:
        ds = DataSource(Path(cfg.path), cfg, seq_length, global_batch_size)
    else:
        path = synthetic_dataset(cfg.synthetic_documents, cfg.synthetic_vocab_size)
        ds = DataSource(path, cfg, seq_length, global_batch_size, synthetic=True)
    if train_steps is not None and ds.num_steps is not None and train_steps > ds.num_steps:
        raise ConfigError(
            f"train.train_steps = {train_steps} exceeds the {ds.num_steps} steps the data schedule provides "
            f"({ds.schedule.total_tokens:,} tokens / ({global_batch_size} x {seq_length}))"
        )
    ds.train_steps = train_steps
    return ds


# ================================================================ command-line handlers (`megatron-moe data`)


def prepare_main(args: Any) -> int:
    """`megatron-moe data prepare`: tokenize inputs into a prepared dataset and print a summary."""
    t0 = time.perf_counter()
    m = prepare_dataset(
        args.inputs, args.output, tokenizer=args.tokenizer, vocab_size=args.vocab_size, eod_token=args.eod_token,
        text_key=args.text_key, separator=args.separator, valid_fraction=args.valid_fraction,
        valid_inputs=args.valid_input or [], split_seed=args.split_seed, workers=args.workers, force=args.force,
        progress=not args.quiet,
    )
    secs = time.perf_counter() - t0
    tr, va = m["splits"]["train"], m["splits"]["valid"]
    print(f"wrote {args.output}: {m['documents']:,} documents ({tr['documents']:,} train, {va['documents']:,} valid), "
          f"{m['tokens']:,} tokens, {m['bytes'] / 1e6:.2f} MB, {m['bytes_per_token']:.3f} bytes/token, "
          f"vocab {m['tokenizer']['vocab_size']:,}, {secs:.1f} s ({m['bytes'] / 1e6 / secs:.2f} MB/s)")
    if m["skipped_empty_documents"]:
        print(f"skipped {m['skipped_empty_documents']:,} empty documents")
    return 0


def inspect_main(args: Any) -> int:
    """`megatron-moe data inspect`: dataset counts and the schedule's tokens, epochs and fingerprint."""
    seq_length, gbs, steps = 256, 8, None
    cfg = DataConfig()
    if args.config:
        from megatron_moe.config import load_run_config

        run = load_run_config(args.config)
        cfg, seq_length, gbs, steps = run.data, run.model.seq_length, run.train.global_batch_size, run.train.train_steps
    if args.path is not None:
        cfg.path = args.path
    for name in ("seed", "unique_tokens", "epochs", "consumed_tokens"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    seq_length = args.seq_length or seq_length
    gbs = args.global_batch_size or gbs
    steps = args.train_steps if args.train_steps is not None else steps
    ds = build_data_source(cfg, seq_length, gbs, steps)
    if args.verify:
        verify_dataset(ds.path, ds.manifest)
    info = ds.describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    m = ds.manifest
    fmt = lambda v: "unbounded" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.4g}"  # noqa: E731
    rows = [
        ("dataset", f"{info['source']} ({ds.path})" if ds.synthetic else info["source"]),
        ("tokenizer", f"{m['tokenizer']['kind']}, vocab {ds.vocab_size:,}, eod {ds.eod_id}, "
                      f"sha256 {m['tokenizer']['sha256'][:12]}"),
        ("documents", f"{m['documents']:,} ({info['train_documents']:,} train, {info['valid_documents']:,} valid)"),
        ("tokens", f"{m['tokens']:,} ({info['train_tokens']:,} train, {info['valid_tokens']:,} valid)"),
        ("bytes/token", f"{ds.bytes_per_token:.4f} (validation split)"),
        ("sequence", f"seq_length {seq_length}, global batch {gbs}, seed {cfg.seed}"),
        ("unique", f"{info['unique_tokens']:,} tokens in {info['unique_documents']:,} documents"
                   + (f" (budget {cfg.unique_tokens:,})" if cfg.unique_tokens else " (all)")),
        ("schedule", f"{fmt(info['schedule_tokens'])} tokens, {fmt(info['schedule_samples'])} samples, "
                     f"{fmt(info['num_steps'])} steps"),
        ("consumed", f"{fmt(info['consumed_tokens'])} tokens" + ("" if steps is None else f" ({steps} train steps)")),
        ("epochs", fmt(info["epochs"])),
        ("fingerprint", info["fingerprint"]),
    ]
    if args.verify:
        rows.append(("checksums", "verified"))
    for k, v in rows:
        print(f"{k:>12}  {v}")
    return 0
