"""The interleave of a weighted blend, by hand and by its prefix property (pure: no data, no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_moe.config import ConfigError
from megatron_moe.data.blend import PERIOD, BlendPattern, slot_counts


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
    assert slot_counts([7.4, 2.6], period=10).tolist() == [7, 3]  # by the remainder, not by the count
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
