"""The report's statistics (trainer/report/stats.py) against textbook values and hand computations."""
from __future__ import annotations

import math

import pytest

from trainer.report import stats as st


def test_mean_sd_uses_n_minus_one():
    assert st.mean_sd([2.0, 4.0, 6.0]) == (4.0, 2.0)
    assert st.mean_sd([5.0]) == (5.0, None)
    with pytest.raises(ValueError):
        st.mean_sd([])


def test_binomial_se():
    assert st.binomial_se(50.0, 100) == pytest.approx(5.0)
    assert st.binomial_se(65.0, 4000) == pytest.approx(100 * math.sqrt(0.65 * 0.35 / 4000))  # the demo: ~0.75
    assert st.binomial_se(100.0, 10) == 0.0


@pytest.mark.parametrize("df,q", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (29, 2.0452),
                                  (120, 1.9799)])
def test_t_quantile_matches_the_tables(df, q):
    assert st.t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)
    assert st.t_quantile(0.025, df) == pytest.approx(-q, abs=1e-4)


def test_t_cdf_closed_forms():
    assert st.t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    assert st.t_cdf(0.0, 7) == 0.5
    t = 1.3
    assert st.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)))  # df = 2 in closed form
    assert st.t_cdf(-t, 5) == pytest.approx(1 - st.t_cdf(t, 5))


def test_paired_ci_and_verdicts():
    ci = st.paired_ci([1.0, 2.0, 3.0], [2.0, 4.0, 5.0])  # differences 1, 2, 2
    half = 4.302653 * math.sqrt(1 / 3) / math.sqrt(3)
    assert (ci.mean, ci.n, ci.method) == (pytest.approx(5 / 3), 3, "paired t")
    assert (ci.lo, ci.hi) == (pytest.approx(5 / 3 - half, abs=1e-5), pytest.approx(5 / 3 + half, abs=1e-5))
    assert ci.verdict == st.BETTER
    assert st.paired_ci([2.0, 4.0, 5.0], [1.0, 2.0, 3.0]).verdict == st.WORSE
    assert st.paired_ci([1.0, 2.0, 3.0], [2.0, 1.0, 3.5]).verdict == st.NOISE
    with pytest.raises(ValueError):
        st.paired_ci([1.0], [2.0])


def test_one_seed_interval_is_validation_noise_only():
    ci = st.binomial_diff_ci(60.0, 400, 70.0, 400)
    half = 1.959964 * math.hypot(st.binomial_se(60, 400), st.binomial_se(70, 400))
    assert ci.hi - ci.lo == pytest.approx(2 * half) and ci.method == "binomial"
    assert ci.verdict == st.ONE_SEED_BEYOND  # never "better" from one seed
    assert st.binomial_diff_ci(60.0, 400, 61.0, 400).verdict == st.NOISE


def test_change_ci_pairs_by_seed():
    a, b = {0: 50.0, 1: 52.0, 2: 51.0}, {1: 55.0, 2: 54.0, 0: 53.0, 7: 10.0}  # seed 7 has no partner
    ci = st.change_ci(a, b, 1000, 1000)
    assert ci.method == "paired t" and ci.n == 3 and ci.mean == pytest.approx(3.0)
    assert st.change_ci({0: 50.0}, {0: 53.0}, 1000, 1000).method == "binomial"
    assert st.change_ci({0: 50.0}, {0: 53.0}, None, 1000) is None
    assert st.change_ci({0: 50.0}, {1: 53.0}, 1000, 1000) is None
