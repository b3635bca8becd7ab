"""Statistics over seeds: mean, sample standard deviation and Student-t confidence intervals, for one arm
or for paired per-seed gaps, and how often the ordering of arms' means holds seed by seed. `t_quantile` is computed here (regularised incomplete beta + bisection): no scipy.
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


def summarize(values: list[float], confidence: float = 0.95) -> Stats:
    """Mean ± std and the t interval mean ± t_{(1+c)/2, n-1} x std / sqrt(n)."""
    n = len(values)
    if n == 0:
        return Stats(0, None, None, None, None, confidence)
    mean = sum(values) / n
    if n < 2:
        return Stats(1, mean, None, None, None, confidence)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
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
