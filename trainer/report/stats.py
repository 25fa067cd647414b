"""The report's statistics: small pure functions, so a reader can check the method (and the tests pin it).

Across seeds: mean and sample standard deviation of each accuracy; for a change between two settings that
share seeds (a rung and the one before it), a paired Student-t 95 % confidence interval of the per-seed
differences, and a verdict from it. With one seed there is no seed-to-seed spread to measure, so each
accuracy gets its binomial standard error on the validation set instead, and a change gets a normal
interval from those two errors (validation noise only).

Means, standard deviations and the normal quantile come from the standard library (`statistics`). It has no
Student-t, and scipy (a ~40 MB dependency) would be here for one number, so `t_cdf`/`t_quantile` are a finite
series and a bisection, checked against the printed tables (tests/test_report_stats.py).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

BETTER, WORSE, NOISE = "better", "worse", "within noise"
ONE_SEED_BEYOND = "beyond val. noise (1 seed)"  # one seed: the interval excludes 0, seed noise unmeasured
Z_975 = statistics.NormalDist().inv_cdf(0.975)  # the standard normal's 97.5 % quantile, 1.95996...


@dataclass(frozen=True)
class Interval:
    """A change (b - a, in points), its confidence interval, the number of pairs and how it was computed."""

    mean: float
    lo: float
    hi: float
    n: int
    method: str  # "paired t" (seeds) or "binomial" (one seed)

    @property
    def verdict(self) -> str:
        return verdict(self)


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator; None for a single value)."""
    if not values:
        raise ValueError("mean_sd of no values")
    m = statistics.fmean(values)
    return m, (statistics.stdev(values, m) if len(values) > 1 else None)


def binomial_se(acc_pct: float, n: int) -> float:
    """Standard error (points) of an accuracy measured on n independent samples: 100 sqrt(p (1 - p) / n)."""
    if n < 1:
        raise ValueError(f"binomial_se needs n >= 1, got {n}")
    p = min(max(acc_pct / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer df >= 1 (Abramowitz & Stegun 26.7.3-4: a finite series)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"t_cdf needs an integer df >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:  # A = 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2.4/(3.5) cos^4 + ...)), df - 2 powers
        term, acc = c, c if df > 1 else 0.0
        for k in range(3, df - 1, 2):
            term *= c * c * (k - 1) / k
            acc += term
        a = 2.0 / math.pi * (theta + s * acc)
    else:  # A = sin (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ...)
        term, acc = 1.0, 1.0
        for k in range(2, df - 1, 2):
            term *= c * c * (k - 1) / k
            acc += term
        a = s * acc
    return 0.5 + 0.5 * a if t >= 0 else 0.5 - 0.5 * a


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with integer df (bisection on t_cdf; exact to ~1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def paired_ci(a: list[float], b: list[float], level: float = 0.95) -> Interval:
    """CI of the mean of b[i] - a[i] over pairs (same seed): mean +- t_{(1+level)/2, n-1} sd / sqrt(n)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_ci needs two equally long lists of 2 or more values, got {len(a)} and {len(b)}")
    d = [y - x for x, y in zip(a, b)]
    m, sd = mean_sd(d)
    half = t_quantile(0.5 + level / 2, len(d) - 1) * sd / math.sqrt(len(d))
    return Interval(m, m - half, m + half, len(d), "paired t")


def binomial_diff_ci(a: float, n_a: int, b: float, n_b: int, level: float = 0.95) -> Interval:
    """One seed: CI of b - a from the two binomial standard errors, as if independent (on one validation set
    the two are positively correlated, so this interval is wider than the truth: conservative)."""
    if level != 0.95:
        raise ValueError("binomial_diff_ci supports level 0.95 only")
    half = Z_975 * math.hypot(binomial_se(a, n_a), binomial_se(b, n_b))
    return Interval(b - a, b - a - half, b - a + half, 1, "binomial")


def verdict(ci: Interval) -> str:
    """'better' when the whole interval lies above 0, 'worse' below, else 'within noise'. With one seed an
    interval that excludes 0 says only that the change exceeds the validation set's noise."""
    if ci.lo <= 0.0 <= ci.hi:
        return NOISE
    if ci.method == "binomial":
        return ONE_SEED_BEYOND
    return BETTER if ci.lo > 0 else WORSE


def change_ci(a: dict[int, float], b: dict[int, float], n_val_a: int | None, n_val_b: int | None
              ) -> Interval | None:
    """The change from setting a to b, each {seed: accuracy}: paired t over their common seeds (2 or more),
    else with exactly one common seed the binomial interval (needs the validation counts); None otherwise."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) >= 2:
        return paired_ci([a[s] for s in seeds], [b[s] for s in seeds])
    if len(seeds) == 1 and n_val_a and n_val_b:
        return binomial_diff_ci(a[seeds[0]], n_val_a, b[seeds[0]], n_val_b)
    return None


def method_note() -> str:
    """One paragraph, for the report, that states the method."""
    return ("Statistics: with several seeds a cell is mean ± sample standard deviation over the seeds, and a "
            "change is the mean of the per-seed differences (runs with the same seed share initialisation, order "
            "and views) with a paired Student-t 95 % confidence interval; 'better' / 'worse' when the interval "
            "excludes 0, else 'within noise'. That interval measures training randomness on this fixed validation "
            "set, not the validation set's own sampling error. With one seed a cell is accuracy ± its binomial "
            "standard error on the validation set (SE), and a change gets a normal 95 % interval from the two "
            "errors (validation noise only, treated as independent: conservative); an interval that excludes 0 "
            f"reads '{ONE_SEED_BEYOND}', since seed-to-seed noise was not measured.")
