"""Statistics over seeds: t quantiles against tables, and paired statistics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from megatron_moe.study.stats import paired, summarize, t_cdf, t_quantile


@pytest.mark.parametrize("p, df, expected", [
    (0.975, 1, 12.7062047), (0.975, 2, 4.3026527), (0.975, 3, 3.1824463), (0.975, 4, 2.7764451),
    (0.975, 5, 2.5705818), (0.975, 10, 2.2281389), (0.975, 30, 2.0422725), (0.975, 1000, 1.9623391),
    (0.95, 2, 2.9199856), (0.995, 3, 5.8409093), (0.9, 7, 1.4149239), (0.025, 4, -2.7764451),
])
def test_t_quantile_matches_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=2e-7)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


def test_t_cdf_basics():
    assert t_cdf(0.0, 3) == 0.5
    assert t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)  # Cauchy: 1/2 + atan(1)/pi
    assert t_cdf(-2.0, 2) == pytest.approx(0.5 * (1 - 2 / math.sqrt(6)), abs=1e-12)  # closed form for df = 2
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_paired_statistics_by_hand():
    baseline = {1: 1.70, 2: 1.65, 3: 1.62, 4: 1.90}  # seed 4 has no MoE partner: left out of the pairing
    moe = {1: 1.60, 2: 1.60, 3: 1.56}
    gaps, st = paired(baseline, moe)
    # gaps 0.10, 0.05, 0.06; mean 0.07; deviations .03, -.02, -.01 -> variance .0014 / 2 = .0007
    assert list(gaps) == [1, 2, 3] and [round(g, 12) for g in gaps.values()] == [0.10, 0.05, 0.06]
    assert st.n == 3
    assert st.mean == pytest.approx(0.07, abs=1e-12)
    assert st.std == pytest.approx(0.0264575131, abs=1e-9)  # sqrt(0.0007)
    # 95%: t(0.975, 2) = 4.3026527; half width 4.3026527 x 0.0264575 / sqrt(3) = 0.0657243
    assert st.ci_low == pytest.approx(0.07 - 0.0657243, abs=1e-6)
    assert st.ci_high == pytest.approx(0.07 + 0.0657243, abs=1e-6)
    st90 = summarize([0.10, 0.05, 0.06], confidence=0.90)  # t(0.95, 2) = 2.9199856
    assert st90.ci_high - st90.mean == pytest.approx(2.9199856 * math.sqrt(0.0007) / math.sqrt(3), abs=1e-7)
    one = summarize([1.5])
    assert (one.n, one.mean, one.std, one.ci_low) == (1, 1.5, None, None)
    assert summarize([]).mean is None
