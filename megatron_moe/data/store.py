"""Prepared datasets on disk: the manifest, its checks, and `TokenStore`, a reader of megatron-core's
`.bin`/`.idx` indexed-dataset format.

A prepared dataset is a directory written by `megatron-moe data prepare`::

    manifest.json            documents, tokens, bytes, tokenizer hash, output checksums, bytes per token
    tokenizer.json           the tokenizer (or tokenizer.model / tokenizer.tiktoken)
    train.bin, train.idx     megatron-core IndexedDataset, one sequence per document, EOD token appended
    valid.bin, valid.idx     held-out documents (same format)
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_moe.config import ConfigError


DATASET_VERSION = 1
MANIFEST = "manifest.json"


VERIFY_MAX_BYTES = 1 << 30  # checksums are verified on load for datasets up to this size (bytes)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


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
    """Compare the checksums of every output file with the manifest, and check that every token id is inside
    the tokenizer's vocabulary (checksums rewritten along with the data would not show that); ConfigError."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    for name, digest in manifest["checksums"].items():
        f = path / name
        if sha256_file(f) != digest:
            raise ConfigError(f"dataset file {str(f)!r} is corrupt (sha256 differs from {MANIFEST})")
    vocab = int(manifest["tokenizer"]["vocab_size"])
    for split in ("train", "valid"):
        prefix = path / manifest["splits"][split]["prefix"]
        tokens = TokenStore.open(prefix).tokens
        top = int(tokens.max()) if len(tokens) else 0
        if top >= vocab or (len(tokens) and int(tokens.min()) < 0):
            raise ConfigError(f"dataset file {str(prefix)!r}.bin holds token id {top if top >= vocab else int(tokens.min())}"
                              f", outside the tokenizer's vocabulary [0, {vocab})")
