"""Statistics over seeds: mean, sample standard deviation and Student-t confidence intervals, for one arm
or for paired per-seed gaps, and how often the ordering of arms' means holds seed by seed. `t_quantile` is
computed here (regularised incomplete beta + bisection): no scipy.

The optimum of a quantity over a grid (an equal-resources study's loss against the activation rate r_a): a
least-squares quadratic in log x through the grid points' means, its minimum within the grid, and an interval
from a seeded bootstrap over seeds (`fit_optimum`). Pure Python, no numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a - 1.0 + m2) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + 1.0 + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (e.g. p = 0.975, df = 2 gives 4.3027), by bisection on `t_cdf`."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p = {p}, df = {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Stats:
    """Mean, sample std (ddof = 1) and a two-sided t confidence interval of a few values (seeds)."""

    n: int
    mean: float | None
    std: float | None
    """None when n < 2."""
    ci_low: float | None
    ci_high: float | None
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "std": self.std, "ci": [self.ci_low, self.ci_high],
                "confidence": self.confidence}


MIN_SEEDS_FOR_INTERVAL = 3
"""Fewer seeds (values) than this give no interval, t or bootstrap: at 2 the t factor is 12.7 and a bootstrap sees 3
distinct means, so any interval would be noise."""
TOO_FEW = "too few seeds for an interval"


def summarize(values: list[float], confidence: float = 0.95) -> Stats:
    """Mean ± std and the t interval mean ± t_{(1+c)/2, n-1} x std / sqrt(n); no interval below
    MIN_SEEDS_FOR_INTERVAL values (at 2 the t factor is 12.7: the interval would say nothing)."""
    n = len(values)
    if n == 0:
        return Stats(0, None, None, None, None, confidence)
    mean = sum(values) / n
    if n < 2:
        return Stats(1, mean, None, None, None, confidence)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if n < MIN_SEEDS_FOR_INTERVAL:
        return Stats(n, mean, std, None, None, confidence)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return Stats(n, mean, std, mean - half, mean + half, confidence)


def paired(baseline: dict[int, float], moe: dict[int, float], confidence: float = 0.95) -> tuple[dict[int, float], Stats]:
    """Per-seed gaps baseline - moe over the seeds both have, and their statistics."""
    seeds = sorted(set(baseline) & set(moe))
    gaps = {s: baseline[s] - moe[s] for s in seeds}
    return gaps, summarize(list(gaps.values()), confidence)


def ordering(best: dict[str, dict[int, float]], arms: list[str]) -> dict[str, Any] | None:
    """`arms` ordered by their mean value (lowest first; e.g. best validation loss, per arm per seed) over the
    seeds all of them have, and the seeds whose own ordering of their values is the same. Equal values keep the
    order of `arms`. None for fewer than two arms or no common seed."""
    if len(arms) < 2:
        return None
    seeds = sorted(set.intersection(*(set(best[a]) for a in arms)))
    if not seeds:
        return None
    means = {a: sum(best[a][s] for s in seeds) / len(seeds) for a in arms}
    order = sorted(arms, key=lambda a: means[a])
    per_seed = {str(s): sorted(arms, key=lambda a: best[a][s]) for s in seeds}
    holds = [s for s, o in per_seed.items() if o == order]
    text = "".join(a if k == 0 else (" = " if means[a] == means[order[k - 1]] else " < ") + a
                   for k, a in enumerate(order))
    return {"order": order, "means": means, "per_seed": per_seed, "seeds_holding": [int(s) for s in holds],
            "n_holding": len(holds), "n": len(seeds), "line": f"{text} in {len(holds)}/{len(seeds)} seeds"}


# ---------------------------------------------------------------- optimum of a loss curve over a grid


def _solve3(a: list[list[float]], b: list[float]) -> list[float] | None:
    """x with a x = b for a 3 x 3 system (Gaussian elimination, partial pivoting); None when singular."""
    m = [row[:] + [v] for row, v in zip(a, b)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, 3):
            f = m[r][col] / m[col][col]
            for c in range(col, 4):
                m[r][c] -= f * m[col][c]
    x = [0.0, 0.0, 0.0]
    for r in (2, 1, 0):
        x[r] = (m[r][3] - sum(m[r][c] * x[c] for c in range(r + 1, 3))) / m[r][r]
    return x


@dataclass(frozen=True)
class QuadraticFit:
    """y = c0 + c1 u + c2 u^2 in u = log(x) - log(x_ref), fitted by least squares, and its minimum over the
    grid's range [x_min, x_max]."""

    coeffs: tuple[float, float, float]
    x_ref: float
    """Geometric mean of the grid: u is centred on it, which keeps the normal equations well conditioned."""
    x_min: float
    x_max: float
    x_opt: float
    """Where the fitted curve is lowest within [x_min, x_max] (an end when the minimum is not interior)."""
    y_opt: float
    interior: bool
    """The curve opens upward (c2 > 0) and its vertex lies strictly inside the grid."""
    vertex: float | None
    """The unconstrained minimum exp(-c1 / (2 c2)) x x_ref when c2 > 0 (may lie outside the grid); None when the
    curve opens downward or is so nearly straight that its vertex is astronomically far."""
    residual_std: float | None
    """Root mean square residual with n - 3 degrees of freedom (None for exactly 3 points)."""

    def predict(self, x: float) -> float:
        u = math.log(x / self.x_ref)
        c0, c1, c2 = self.coeffs
        return c0 + c1 * u + c2 * u * u


def fit_log_quadratic(xs: list[float], ys: list[float]) -> QuadraticFit | None:
    """Least-squares quadratic in log x through (xs, ys); None with fewer than 3 distinct x (or non-positive x)."""
    if len(xs) != len(ys) or len({round(x, 12) for x in xs}) < 3 or min(xs) <= 0:
        return None
    x_ref = math.exp(sum(math.log(x) for x in xs) / len(xs))
    us = [math.log(x / x_ref) for x in xs]
    s = [sum(u ** k for u in us) for k in range(5)]
    t = [sum(y * u ** k for u, y in zip(us, ys)) for k in range(3)]
    c = _solve3([[s[0], s[1], s[2]], [s[1], s[2], s[3]], [s[2], s[3], s[4]]], t)
    if c is None:
        return None
    c0, c1, c2 = c
    u_lo, u_hi = min(us), max(us)
    vertex = -c1 / (2 * c2) if c2 > 0 else None
    if vertex is not None and abs(vertex) > 50:  # a nearly straight curve: its vertex is e^50 grid widths away
        vertex = None
    interior = vertex is not None and u_lo < vertex < u_hi
    if interior:
        u_opt = vertex
    else:  # a line, a cap or a vertex outside: the curve's lowest point on the grid is an end of it
        u_opt = min((u_lo, u_hi), key=lambda u: c0 + c1 * u + c2 * u * u)
    n = len(xs)
    resid = [y - (c0 + c1 * u + c2 * u * u) for u, y in zip(us, ys)]
    return QuadraticFit(
        coeffs=(c0, c1, c2), x_ref=x_ref, x_min=min(xs), x_max=max(xs), x_opt=x_ref * math.exp(u_opt),
        y_opt=c0 + c1 * u_opt + c2 * u_opt * u_opt, interior=interior,
        vertex=None if vertex is None else x_ref * math.exp(vertex),
        residual_std=math.sqrt(sum(r * r for r in resid) / (n - 3)) if n > 3 else None,
    )


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of already sorted values, q in [0, 100]."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class Optimum:
    """The fitted optimum of per-seed values over a grid, with a seed-bootstrap interval."""

    fit: QuadraticFit
    """The fit through the arms' means."""
    ci_low: float | None
    ci_high: float | None
    """Percentiles (100 - c) / 2 and (100 + c) / 2 of the resampled optima (None without resamples)."""
    confidence: float
    resamples: int
    """Bootstrap resamples that gave a fit."""
    interior_fraction: float | None
    """Fraction of those whose own minimum was interior."""
    seed: int
    """Seed of the resampler (fixed, so a report is reproducible)."""
    at_edge: bool
    """The optimum is not bracketed by the grid: the fit has no interior minimum, or the lowest mean is an end."""
    best_x: float
    """The grid point with the lowest mean."""

    def to_dict(self) -> dict[str, Any]:
        f = self.fit
        return {"x_opt": f.x_opt, "y_opt": f.y_opt, "interior": f.interior, "vertex": f.vertex,
                "coeffs": list(f.coeffs), "x_ref": f.x_ref, "x_min": f.x_min, "x_max": f.x_max,
                "residual_std": f.residual_std, "ci": [self.ci_low, self.ci_high], "confidence": self.confidence,
                "resamples": self.resamples, "interior_fraction": self.interior_fraction, "bootstrap_seed": self.seed,
                "at_edge": self.at_edge, "best_x": self.best_x}


def fit_optimum(per_seed: dict[float, dict[int, float] | list[float]], confidence: float = 0.95,
                resamples: int = 2000, seed: int = 0) -> Optimum | None:
    """The minimum over x of a quadratic in log x through the mean of each grid point's per-seed values, and a paired
    bootstrap interval over seeds: each resample draws seeds with replacement, the same draw for every grid point
    (a seed's init and data order are shared by its arms, so its effect cancels in the optimum rather than widening
    it), refits through the resampled means and takes the minimum within the grid; the interval is the central
    `confidence` share of those minima. Only seeds every grid point has are drawn, and with fewer than
    MIN_SEEDS_FOR_INTERVAL of them there is no interval. Values are {seed: value} (a list is keyed by position).
    Seeded by `seed`, so the same values give the same interval. None with fewer than 3 grid points that have values."""
    import random

    per_seed = {x: dict(enumerate(v)) if isinstance(v, list) else dict(v) for x, v in per_seed.items()}
    grid = sorted(x for x, v in per_seed.items() if v)
    means = [sum(per_seed[x].values()) / len(per_seed[x]) for x in grid]
    fit = fit_log_quadratic(grid, means)
    if fit is None:
        return None
    rng = random.Random(seed)
    optima, interior = [], 0
    shared = sorted(set.intersection(*(set(per_seed[x]) for x in grid)))
    if len(shared) >= MIN_SEEDS_FOR_INTERVAL:
        for _ in range(resamples):
            draw = rng.choices(shared, k=len(shared))
            f = fit_log_quadratic(grid, [sum(per_seed[x][s] for s in draw) / len(draw) for x in grid])
            if f is not None:
                optima.append(f.x_opt)
                interior += f.interior
    optima.sort()
    tail = 50.0 * (1.0 - confidence)
    lo, hi = (_percentile(optima, tail), _percentile(optima, 100.0 - tail)) if optima else (None, None)
    best = grid[min(range(len(grid)), key=lambda i: means[i])]
    at_edge = not fit.interior or best in (grid[0], grid[-1])
    return Optimum(fit=fit, ci_low=lo, ci_high=hi, confidence=confidence, resamples=len(optima),
                   interior_fraction=interior / len(optima) if optima else None, seed=seed, at_edge=at_edge,
                   best_x=best)
