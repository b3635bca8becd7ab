"""Data-reuse schedules: which documents are trained on, in which order, for how many epochs.

From the training documents, `unique_tokens` selects whole documents in a seeded order (a fixed
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
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from megatron_moe.config import ConfigError


STREAM_VERSION = 1  # bump when the sample-stream algorithm changes: it is part of every fingerprint

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
