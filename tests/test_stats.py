"""evaluation.stats: bootstrap confidence intervals, checked against large-sample theory and an
independent loop over explicit resamples."""
import numpy as np
import pytest

from evaluation.stats import bootstrap_ci, ratio_of_means

Z975 = 1.959964  # standard normal 97.5% quantile


def test_mean_ci_matches_the_normal_theory_interval():
    # For the mean of n cases the bootstrap distribution is close to normal with the plug-in
    # standard error s / sqrt(n) (ddof=0), so the 95% percentile interval is ~ mean +- 1.96 SE.
    x = np.random.default_rng(1).exponential(size=400)
    lo, hi = bootstrap_ci(x, resamples=20000)
    se = x.std() / np.sqrt(len(x))
    width = 2 * Z975 * se
    assert lo == pytest.approx(x.mean() - Z975 * se, abs=0.06 * width)
    assert hi == pytest.approx(x.mean() + Z975 * se, abs=0.06 * width)


def test_ratio_of_means_ci_matches_the_delta_method():
    # rate = mean(a) / mean(b); delta method: Var ~ (Var a - 2 r Cov(a, b) + r^2 Var b) / (n mean(b)^2)
    rng = np.random.default_rng(2)
    b = rng.uniform(0.05, 0.3, 500)
    a = 3 * b + rng.normal(0, 0.1, 500) + 0.2  # correlated with b, as C_m and C_non are
    r = a.mean() / b.mean()
    cov = np.cov(a, b, ddof=0)
    se = np.sqrt((cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / len(a)) / b.mean()
    lo, hi = bootstrap_ci((a, b), statistic=ratio_of_means, resamples=20000)
    width = 2 * Z975 * se
    assert lo == pytest.approx(r - Z975 * se, abs=0.08 * width)
    assert hi == pytest.approx(r + Z975 * se, abs=0.08 * width)
    # resampled as pairs: drawing a and b independently would give a clearly wider interval
    # (their positive covariance no longer cancels), which the paired interval must not be
    indep = np.sqrt((cov[0, 0] + r * r * cov[1, 1]) / len(a)) / b.mean()
    assert hi - lo < 0.8 * 2 * Z975 * indep


def test_same_as_an_explicit_loop_over_resamples():
    # an independent implementation: python loop, other generator seed, np.percentile of the means
    x = np.random.default_rng(3).normal(0.6, 0.2, 120)
    rng = np.random.default_rng(99)
    means = [x[rng.integers(0, len(x), len(x))].mean() for _ in range(20000)]
    ref = np.percentile(means, [2.5, 97.5])
    lo, hi = bootstrap_ci(x, resamples=20000, seed=7)
    width = ref[1] - ref[0]
    assert abs(lo - ref[0]) < 0.05 * width and abs(hi - ref[1]) < 0.05 * width


def test_level_seed_and_degenerate_cases():
    x = np.random.default_rng(4).normal(size=60)
    assert bootstrap_ci(x, seed=5) == bootstrap_ci(x, seed=5)
    lo90, hi90 = bootstrap_ci(x, level=0.90)
    lo99, hi99 = bootstrap_ci(x, level=0.99)
    assert lo99 < lo90 < x.mean() < hi90 < hi99
    assert bootstrap_ci(np.full(30, 0.25)) == (0.25, 0.25)  # no spread, no interval
    a = np.random.default_rng(6).uniform(0.1, 1, 50)
    assert bootstrap_ci((a, a), statistic=ratio_of_means) == pytest.approx((1.0, 1.0))  # pairs stay pairs
    assert all(np.isnan(bootstrap_ci([])))
    with pytest.raises(ValueError, match="equally long"):
        bootstrap_ci(([1.0, 2.0], [1.0]), statistic=ratio_of_means)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(x, level=95)
