"""How a blend of datasets interleaves their samples: which dataset, and which of its samples, each sample of the
blended stream is.

Weights are rounded to whole slots of a period of PERIOD samples (largest remainders, at least one slot each).
Within a period the slots of dataset i fall at the times (k + 1/2) / n_i, k < n_i, merged in time order (ties to the
lower index), the period repeating. So every prefix of the stream holds each dataset's share to within one sample
of its rounded weight, the same at any length, and sample j's origin is found in O(1) without the samples before
it (Megatron-LM's blended index has the same prefix property but is built sample by sample). Pure numpy, no I/O.
"""

from __future__ import annotations

import numpy as np

from megatron_moe.config import ConfigError

PERIOD = 1 << 16
"""Samples in one period of the interleave: weights are realised to 1/PERIOD."""


def slot_counts(weights: list[float], period: int = PERIOD) -> np.ndarray:
    """Slots per period of each dataset: `weights` normalised and rounded to whole slots by largest remainder."""
    w = np.asarray(weights, np.float64)
    exact = w / w.sum() * period
    counts = np.floor(exact).astype(np.int64)
    short = period - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    if (counts == 0).any():
        i = int(np.flatnonzero(counts == 0)[0])
        raise ConfigError(f"data.blend_weights = {list(weights)}: weight {weights[i]} is below 1/{period} of the "
                          "total, too small to give its dataset a sample")
    return counts


class BlendPattern:
    """The origin (dataset, sample index in that dataset) of each sample of a blended stream."""

    def __init__(self, weights: list[float], period: int = PERIOD) -> None:
        self.period = period
        self.counts = slot_counts(weights, period)
        which = np.repeat(np.arange(len(self.counts)), self.counts)
        k = np.concatenate([np.arange(n) for n in self.counts])
        times = (2 * k + 1) / (2 * self.counts[which])
        order = np.lexsort((which, times))
        self.dataset = which[order]  # slot -> dataset
        self.rank = k[order]  # slot -> the dataset's sample index within the period
        self.slot = [np.flatnonzero(self.dataset == i) for i in range(len(self.counts))]  # dataset, rank -> slot

    def origin(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, index in that dataset's stream) of blended samples `samples` (int64 array)."""
        p, r = np.divmod(np.asarray(samples, np.int64), self.period)
        ds = self.dataset[r]
        return ds, p * self.counts[ds] + self.rank[r]

    def position(self, dataset: int, index: int) -> int:
        """The blended sample that is sample `index` of `dataset`."""
        p, k = divmod(index, int(self.counts[dataset]))
        return p * self.period + int(self.slot[dataset][k])

    def length(self, available: list[int]) -> int:
        """Blended samples before the first dataset runs out, when dataset i holds `available[i]` samples."""
        return min(self.position(i, n) for i, n in enumerate(available))

    def taken(self, count: int) -> np.ndarray:
        """Samples of each dataset among the first `count` blended samples."""
        p, r = divmod(count, self.period)
        return p * self.counts + np.bincount(self.dataset[:r], minlength=len(self.counts))
