"""The trainer's data source: a prepared dataset plus a schedule, giving the global batch of each optimizer
step, the validation batches, and a fingerprint of the whole sample stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from megatron_moe.config import ConfigError, DataConfig, RunConfig
from megatron_moe.data.blend import BlendPattern
from megatron_moe.data.corpora import DEFAULT_VOCAB_SIZE, corpus_dataset
from megatron_moe.data.schedule import STREAM_VERSION, Schedule
from megatron_moe.data.store import MANIFEST, VERIFY_MAX_BYTES, TokenStore, read_manifest, verify_dataset
from megatron_moe.data.tokenizers import TextTokenizer, load_tokenizer

FINGERPRINT_EPOCHS = 8  # epochs of an unbounded schedule the fingerprint covers
MAX_UNASKED_EPOCHS = 4
"""Passes over the built-in real-text corpus a run may make without its schedule asking for them."""


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


class DataSource:
    """Training batches by step, fixed validation batches, and a fingerprint of the sample stream."""

    def __init__(
        self, path: Path, cfg: DataConfig, seq_length: int, global_batch_size: int, *, builtin: str | None = None
    ) -> None:
        if global_batch_size <= 0:
            raise ConfigError(f"global_batch_size = {global_batch_size} must be > 0")
        self.path, self.cfg, self.builtin = path, cfg, builtin
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
        step += self.cfg.start_batch
        if step < 0 or (self.num_steps is not None and step >= self.num_steps):
            raise ConfigError(f"data schedule provides {self.num_steps} optimizer steps; step {step} asked")
        return self.samples(step * self.global_batch_size, self.global_batch_size)

    def samples(self, first: int, count: int) -> np.ndarray:
        """Training samples [first, first + count) as int64 [count, seq_length + 1]."""
        s = self.seq_length
        length = count * s + 1
        stream = _read_segments(self.train, self.schedule.segments(first * s, length), length)
        return _samples(stream, count, s)

    def valid_batch_count(self, batch_size: int, num_batches: int) -> int:
        """Batches an evaluation of `num_batches` (0 = all complete ones of the split) takes; ConfigError when the
        validation split is too small for them."""
        s = self.seq_length
        whole = num_batches == 0
        if whole:
            num_batches = max(1, (self.valid.num_tokens - 1) // (batch_size * s))
        need = batch_size * num_batches * s + 1
        if need > self.valid.num_tokens:
            lower = "lower train.global_batch_size" if whole else "lower train.eval_iters"
            raise ConfigError(
                f"validation split has {self.valid.num_tokens:,} tokens; {num_batches} batches of {batch_size} x "
                f"{s + 1} need {need:,} ({lower} or "
                f"{'raise data.synthetic_documents' if self.builtin == 'synthetic' else 'hold out more documents'})"
            )
        return num_batches

    @property
    def num_valid_samples(self) -> int:
        """Held-out samples the validation split holds."""
        return (self.valid.num_tokens - 1) // self.seq_length

    def valid_samples(self, first: int, count: int) -> np.ndarray:
        """Held-out samples [first, first + count) as int64 [count, seq_length + 1]: the validation documents in
        stored order, one stream."""
        s = self.seq_length
        stream = np.asarray(self.valid.tokens[first * s : (first + count) * s + 1], np.int64)
        return _samples(stream, count, s)

    def valid_batches(self, batch_size: int, num_batches: int) -> list[np.ndarray]:
        """The first batch_size x num_batches held-out samples (0 batches = every complete batch)."""
        num_batches = self.valid_batch_count(batch_size, num_batches)
        all_samples = self.valid_samples(0, batch_size * num_batches)
        return [all_samples[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the sample stream: dataset checksums, schedule fields, the document order of every
        epoch, the first samples and samples spread over the whole stream. An unbounded schedule is covered for
        its first FINGERPRINT_EPOCHS epochs. Independent of the run length, so arms of different lengths on one
        data config share it."""
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
            covered = sch.total_tokens if sch.total_tokens is not None else FINGERPRINT_EPOCHS * sch.unique_tokens
            for epoch in range(-(-covered // sch.unique_tokens)):
                h.update(sch.epoch_order(epoch)[0].tobytes())
            n = (covered - 1) // self.seq_length
            h.update(self.samples(0, min(64, n)).tobytes())
            for i in np.unique(np.linspace(0, n - 1, 64).astype(np.int64)):
                h.update(self.samples(int(i), 1).tobytes())
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
            "source": self.builtin or str(self.path),
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

    def repeats(self, train_steps: int) -> str | None:
        """A note when a run of `train_steps` reads its data more than once without its config asking (no unique-token
        budget, data.epochs or data.consumed_tokens: the stream simply starts over); None otherwise. ConfigError
        when that run would read the built-in real-text corpus more than MAX_UNASKED_EPOCHS times: a study of
        such a run measures memorisation of a small corpus, not what the config's scale suggests."""
        if self.cfg.unique_tokens or self.cfg.epochs or self.cfg.consumed_tokens:
            return None
        epochs = train_steps * self.global_batch_size * self.seq_length / self.schedule.unique_tokens
        if epochs <= 1.0:
            return None
        what = f"the built-in {self.builtin} corpus" if self.builtin else f"data.path = {str(self.path)!r}"
        if self.builtin == "tinystories" and epochs > MAX_UNASKED_EPOCHS:
            raise ConfigError(
                f"train.train_steps = {train_steps} would read {what} {epochs:.1f} times over "
                f"({self.schedule.unique_tokens:,} unique tokens); give data.path = a prepared dataset of the size "
                f"the budget needs, or ask for the repeats with data.epochs = {math.ceil(epochs)}")
        return (f"note: {what} is read {epochs:.2f} times over ({self.schedule.unique_tokens:,} unique tokens); "
                "the config did not ask for repeats (data.unique_tokens, data.epochs and data.consumed_tokens unset)")

    @property
    def tokenizer(self) -> TextTokenizer:
        """The dataset's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            tok = self.manifest["tokenizer"]
            self._tokenizer = load_tokenizer(self.path / tok["file"], tok["eod_token"])
        return self._tokenizer

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(ids)


class BlendedSource:
    """Several prepared datasets as one sample stream (`data.blend`): each dataset a `DataSource` with its share of
    the budget, their training samples and their validation samples interleaved by one `BlendPattern`."""

    def __init__(self, cfg: DataConfig, seq_length: int, global_batch_size: int) -> None:
        weights = list(cfg.blend_weights) or [1.0] * len(cfg.blend)
        self.cfg, self.builtin = cfg, None
        self.seq_length, self.global_batch_size = seq_length, global_batch_size
        self.pattern = BlendPattern(weights)
        share = self.pattern.counts / self.pattern.period
        self.weights = [float(x) for x in share]
        self.parts = []
        for i, (path, w) in enumerate(zip(cfg.blend, share)):
            part = dataclasses.replace(cfg, path=path, blend=[], blend_weights=[], start_batch=0,
                                       unique_tokens=int(w * cfg.unique_tokens),
                                       consumed_tokens=int(w * cfg.consumed_tokens))
            try:
                self.parts.append(DataSource(Path(path), part, seq_length, global_batch_size))
            except ConfigError as exc:
                raise ConfigError(f"data.blend[{i}] = {path!r}: {exc}") from None
        first = self.parts[0]
        for path, part in zip(cfg.blend[1:], self.parts[1:]):
            if part.manifest["tokenizer"]["sha256"] != first.manifest["tokenizer"]["sha256"]:
                raise ConfigError(f"data.blend: {path!r} has another tokenizer than {cfg.blend[0]!r}; a blend's "
                                  "datasets must be prepared with one tokenizer")
        # The tokenizer's home (every part has the same one).
        self.path, self.manifest = first.path, first.manifest
        self.vocab_size, self.eod_id = first.vocab_size, first.eod_id
        # Bits per byte: the validation samples' bytes per token, each part's split in its share of the samples.
        self.bytes_per_token = float(sum(w * part.bytes_per_token for w, part in zip(share, self.parts)))
        sizes = [part.schedule.num_samples for part in self.parts]
        self.num_samples = None if None in sizes else self.pattern.length(sizes)
        self._fingerprint: str | None = None
        self.train_steps: int | None = None

    @property
    def num_steps(self) -> int | None:
        return None if self.num_samples is None else self.num_samples // self.global_batch_size

    def _gather(self, first: int, count: int, read) -> np.ndarray:
        """Blended samples [first, first + count), part i's read by `read(part, first_index, count)`."""
        which, index = self.pattern.origin(np.arange(first, first + count))
        out = np.empty((count, self.seq_length + 1), np.int64)
        for i, part in enumerate(self.parts):
            rows = np.flatnonzero(which == i)
            if len(rows):  # a part's samples in a range of the blend are consecutive in its own stream
                out[rows] = read(part, int(index[rows[0]]), len(rows))
        return out

    def train_batch(self, step: int) -> np.ndarray:
        step += self.cfg.start_batch
        if step < 0 or (self.num_steps is not None and step >= self.num_steps):
            raise ConfigError(f"data schedule provides {self.num_steps} optimizer steps; step {step} asked")
        return self.samples(step * self.global_batch_size, self.global_batch_size)

    def samples(self, first: int, count: int) -> np.ndarray:
        return self._gather(first, count, lambda part, i, n: part.samples(i, n))

    @property
    def num_valid_samples(self) -> int:
        return self.pattern.length([part.num_valid_samples for part in self.parts])

    def valid_samples(self, first: int, count: int) -> np.ndarray:
        return self._gather(first, count, lambda part, i, n: part.valid_samples(i, n))

    def valid_batch_count(self, batch_size: int, num_batches: int) -> int:
        whole = num_batches == 0
        if whole:
            num_batches = max(1, self.num_valid_samples // batch_size)
        if batch_size * num_batches > self.num_valid_samples:
            raise ConfigError(
                f"the blend's validation splits hold {self.num_valid_samples:,} samples of {self.seq_length + 1} "
                f"tokens in its proportions; {num_batches} batches of {batch_size} need {batch_size * num_batches:,} "
                f"({'lower train.global_batch_size' if whole else 'lower train.eval_iters'} or hold out more documents)")
        return num_batches

    def valid_batches(self, batch_size: int, num_batches: int) -> list[np.ndarray]:
        num_batches = self.valid_batch_count(batch_size, num_batches)
        all_samples = self.valid_samples(0, batch_size * num_batches)
        return [all_samples[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the blended stream: every part's fingerprint (its whole stream), the interleave and
        blended samples spread over the stream."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps({
                "stream_version": STREAM_VERSION, "parts": [part.fingerprint() for part in self.parts],
                "slots": self.pattern.counts.tolist(), "period": self.pattern.period,
                "seq_length": self.seq_length, "global_batch_size": self.global_batch_size,
                "num_steps": self.num_steps,
            }, sort_keys=True).encode())
            n = min(self.num_samples or self.pattern.period, self.pattern.period)  # a period: the whole interleave
            h.update(self.samples(0, min(64, n)).tobytes())
            for i in np.unique(np.linspace(0, n - 1, 64).astype(np.int64)):
                h.update(self.samples(int(i), 1).tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def _consumed(self, train_steps: int | None) -> list[int | None]:
        """Tokens each part gives a run of `train_steps`."""
        steps = train_steps if train_steps is not None else self.num_steps
        if steps is None:
            return [None] * len(self.parts)
        taken = self.pattern.taken(steps * self.global_batch_size)
        return [int(n) * self.seq_length for n in taken]

    def describe(self, train_steps: int | None = None) -> dict[str, Any]:
        """`DataSource.describe`'s fields for the whole blend (sums over the parts), and each part's under "blend"."""
        train_steps = train_steps if train_steps is not None else self.train_steps
        steps = train_steps if train_steps is not None else self.num_steps
        consumed = None if steps is None else steps * self.global_batch_size * self.seq_length
        parts = []
        for w, part, used in zip(self.weights, self.parts, self._consumed(train_steps)):
            d = part.describe()
            d.update(weight=w, consumed_tokens=used,
                     epochs=None if used is None else used / part.schedule.unique_tokens)
            parts.append(d)

        def total(key: str) -> int:
            return sum(int(d[key]) for d in parts)

        unique = total("unique_tokens")
        return {
            "source": f"blend of {len(parts)} datasets",
            "dataset_dir": str(self.path),
            "tokenizer": parts[0]["tokenizer"],
            "vocab_size": self.vocab_size,
            **{k: total(k) for k in ("train_documents", "train_tokens", "valid_documents", "valid_tokens",
                                     "unique_documents", "unique_tokens")},
            "bytes_per_token": self.bytes_per_token,
            "seed": self.cfg.seed,
            "seq_length": self.seq_length,
            "global_batch_size": self.global_batch_size,
            "unique_tokens_requested": self.cfg.unique_tokens,
            "schedule_tokens": None if self.num_samples is None else self.num_samples * self.seq_length,
            "schedule_samples": self.num_samples,
            "num_steps": self.num_steps,
            "consumed_tokens": consumed,
            "epochs": None if consumed is None else consumed / unique,
            "fingerprint": self.fingerprint(),
            "blend": parts,
        }

    def repeats(self, train_steps: int) -> str | None:
        """A note when a run of `train_steps` reads a part more than once without the config asking."""
        if self.cfg.unique_tokens or self.cfg.epochs or self.cfg.consumed_tokens:
            return None
        over = [(path, used / part.schedule.unique_tokens)
                for path, part, used in zip(self.cfg.blend, self.parts, self._consumed(train_steps))
                if used / part.schedule.unique_tokens > 1.0]
        if not over:
            return None
        return ("note: " + ", ".join(f"data.blend {path!r} is read {e:.2f} times over" for path, e in over)
                + "; the config did not ask for repeats (data.unique_tokens, data.epochs and data.consumed_tokens "
                "unset)")

    @property
    def tokenizer(self) -> TextTokenizer:
        return self.parts[0].tokenizer

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(ids)


def vocabulary_size(cfg: DataConfig) -> int:
    """The vocabulary of the tokenizer of the data `cfg` names, read without loading it: a prepared dataset's
    manifest, or the size the built-in corpus's BPE is trained to."""
    if not cfg.datasets():
        return cfg.corpus_vocab_size or DEFAULT_VOCAB_SIZE[cfg.corpus]
    path = Path(cfg.datasets()[0])  # a blend's datasets share one tokenizer (checked when it is built)
    if not (path / MANIFEST).is_file():
        field = "data.blend" if cfg.blend else "data.path"
        raise ConfigError(f"model.vocab_size = 0 takes the vocabulary from {field} = {str(path)!r}, which holds no "
                          f"prepared dataset ({MANIFEST}); set model.vocab_size or prepare the data first")
    return int(read_manifest(path)["tokenizer"]["vocab_size"])


def with_data_vocabulary(cfg: RunConfig) -> RunConfig:
    """`cfg` with model.vocab_size = 0 ("from the data", as Megatron-LM derives it from its tokenizer) replaced by
    the data's vocabulary (`vocabulary_size`); unchanged otherwise. Every command resolves it on loading, so the
    planner, the run hash and the run's config.toml see the number."""
    if cfg.model.vocab_size:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocabulary_size(cfg.data)))


def build_data_source(
    cfg: DataConfig, seq_length: int, global_batch_size: int, train_steps: int | None = None
) -> DataSource | BlendedSource:
    """The trainer's data: `cfg.blend` (prepared datasets blended), `cfg.path` (a prepared dataset) or, when both are
    empty, the built-in corpus `cfg.corpus`.

    With `train_steps`, a finite schedule that cannot feed that many steps is refused here, at start-up.
    """
    cfg.validate()
    ds: DataSource | BlendedSource
    if cfg.blend:
        ds = BlendedSource(cfg, seq_length, global_batch_size)
    elif cfg.path:
        ds = DataSource(Path(cfg.path), cfg, seq_length, global_batch_size)
    else:
        ds = DataSource(corpus_dataset(cfg), cfg, seq_length, global_batch_size, builtin=cfg.corpus)
    if train_steps is not None:
        train_steps += cfg.start_batch  # the stream a run started at batch k reads: k batches before its own
    if train_steps is not None and ds.num_steps is not None and train_steps > ds.num_steps:
        tokens = ds.schedule.total_tokens if isinstance(ds, DataSource) else ds.num_samples * seq_length
        raise ConfigError(
            f"train.train_steps{' + data.start_batch' if cfg.start_batch else ''} = {train_steps} exceeds the "
            f"{ds.num_steps} steps the data schedule provides "
            f"({tokens:,} tokens / ({global_batch_size} x {seq_length}))"
        )
    if train_steps is not None:
        ds.repeats(train_steps)  # refused here when too many
    ds.train_steps = train_steps
    return ds
