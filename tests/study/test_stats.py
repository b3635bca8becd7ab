"""Statistics over seeds: t quantiles against tables, paired statistics against hand-computed values, and the
fitted optimum over a grid (a quadratic in log x with a seed-bootstrap interval)."""

from __future__ import annotations

import math
import random

import pytest

from megatron_moe.study.stats import fit_log_quadratic, fit_optimum, paired, summarize, t_cdf, t_quantile


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


# ---------------------------------------------------------------- optimum over a grid

GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


def _loss(r: float, r_opt: float = 0.18) -> float:
    return 2.0 + 0.3 * math.log(r / r_opt) ** 2


def _per_seed(n_seeds: int, noise: float, seed: int = 7, loss=_loss) -> dict[float, list[float]]:
    rng = random.Random(seed)
    return {r: [loss(r) + rng.gauss(0.0, noise) for _ in range(n_seeds)] for r in GRID}


def test_quadratic_in_log_x_is_exact_for_a_parabola():
    fit = fit_log_quadratic(list(GRID), [_loss(r) for r in GRID])
    assert fit.x_opt == pytest.approx(0.18, rel=1e-9) and fit.vertex == pytest.approx(0.18, rel=1e-9)
    assert fit.y_opt == pytest.approx(2.0, abs=1e-12) and fit.interior and fit.residual_std == pytest.approx(0, abs=1e-9)
    assert fit.predict(0.3) == pytest.approx(_loss(0.3), abs=1e-12)
    assert fit_log_quadratic([0.1, 0.2], [1.0, 2.0]) is None  # a quadratic needs 3 distinct points


def test_fit_recovers_a_known_optimum_and_its_interval_shrinks_with_seeds():
    few = fit_optimum(_per_seed(5, 0.02))
    many = fit_optimum(_per_seed(40, 0.02))
    for opt in (few, many):
        assert opt.ci_low < 0.18 < opt.ci_high and not opt.at_edge and opt.interior_fraction > 0.9
        assert opt.resamples == 2000 and opt.seed == 0 and opt.best_x in (0.15, 0.2)
    assert many.fit.x_opt == pytest.approx(0.18, rel=0.05)
    width_few, width_many = few.ci_high - few.ci_low, many.ci_high - many.ci_low
    assert width_many < 0.5 * width_few  # ~ 1 / sqrt(seeds): 40 seeds vs 5
    # seeded: the same values give the same interval; another resampler seed another one
    again = fit_optimum(_per_seed(5, 0.02))
    assert (again.ci_low, again.ci_high) == (few.ci_low, few.ci_high)
    other = fit_optimum(_per_seed(5, 0.02), seed=1)
    assert (other.ci_low, other.ci_high) != (few.ci_low, few.ci_high)
    # a narrower confidence gives a narrower interval inside the wider one
    narrow = fit_optimum(_per_seed(5, 0.02), confidence=0.5)
    assert few.ci_low <= narrow.ci_low < narrow.ci_high <= few.ci_high


@pytest.mark.parametrize("loss, interior, x_opt", [
    (lambda r: 2.0 - 0.1 * math.log(r), False, 0.5),           # still falling at the densest arm
    (lambda r: 2.0 + 0.3 * math.log(r / 0.02) ** 2, False, 0.05),  # the vertex lies below the grid
    (lambda r: 2.0 - 0.3 * math.log(r / 0.18) ** 2, False, None),  # opens downward: no minimum at all
])
def test_an_optimum_at_the_grid_edge_is_flagged(loss, interior, x_opt):
    opt = fit_optimum(_per_seed(3, 0.001, loss=loss))
    assert opt.at_edge and opt.fit.interior is interior
    if x_opt is not None:
        assert opt.fit.x_opt == pytest.approx(x_opt) and opt.best_x == x_opt
    else:
        assert opt.fit.vertex is None and opt.fit.x_opt in (GRID[0], GRID[-1])
    # the bootstrap optima stay on the grid's range: the interval never extrapolates
    assert GRID[0] <= opt.ci_low <= opt.ci_high <= GRID[-1]
    assert fit_optimum({0.1: [1.0], 0.2: [0.9]}) is None


def test_the_bootstrap_resamples_seeds_jointly_across_the_grid():
    """A seed effect shared by every arm (its init and data order) moves all means together, which cannot move the
    optimum: resampling seeds jointly gives every resample the optimum of the seed-free curve, a zero-width interval
    (by hand: each resampled mean is loss(r) + the mean of the drawn seeds' offsets, the same for every r). Resampled
    arm by arm, the offsets would not cancel and the interval would be wide."""
    offsets = {1: -0.3, 2: 0.0, 3: 0.25, 4: 0.5}
    per_seed = {r: {s: _loss(r) + off for s, off in offsets.items()} for r in GRID}
    opt = fit_optimum(per_seed)
    assert opt.ci_low == pytest.approx(0.18, rel=1e-9) and opt.ci_high == pytest.approx(0.18, rel=1e-9)
    # only seeds every grid point has are drawn: dropping seed 4 from one arm leaves 3 shared seeds, still exact
    per_seed[GRID[0]].pop(4)
    assert fit_optimum(per_seed).ci_high == pytest.approx(0.18, rel=1e-9)


def test_fewer_than_three_seeds_give_no_interval():
    opt = fit_optimum(_per_seed(2, 0.02))
    assert opt.fit is not None and (opt.ci_low, opt.ci_high) == (None, None) and opt.resamples == 0
    assert fit_optimum(_per_seed(3, 0.02)).ci_low is not None
