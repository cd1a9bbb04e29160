"""Bootstrap confidence intervals over cases, for benchmark and dataset figures.

    lo, hi = bootstrap_ci(ious)                                  # 95% CI of the mean IoU
    lo, hi = bootstrap_ci((c_m, c_non), statistic=ratio_of_means)  # CI of C_m / C_non (Table 1's rate)

Percentile bootstrap (Efron & Tibshirani 1993, ch. 13): draw the n cases with replacement
`resamples` times, compute the statistic on each draw, and take the (1 - level) / 2 and
(1 + level) / 2 percentiles of those values. Paired columns (C_m and C_non of the same case) are
drawn together, so a ratio of means keeps the correlation between its numerator and denominator.
The draws come from their own seeded generator: the same data and seed give the same interval.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["bootstrap_ci", "mean", "ratio_of_means"]

RESAMPLES = 2000  # enough for the 2.5 / 97.5 percentiles to move by < 1% of the width between seeds
CHUNK = 500  # resamples drawn at once (bounds the index array to CHUNK x n)


def mean(a: np.ndarray) -> np.ndarray:
    """Mean over the last axis (one value per resample)."""
    return a.mean(-1)


def ratio_of_means(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """mean(a) / mean(b) per resample: the dataset-level rate C_m / C_non of the paper's Table 1."""
    return a.mean(-1) / b.mean(-1)


def bootstrap_ci(data: np.ndarray | Sequence[float] | tuple, statistic: Callable[..., np.ndarray] = mean,
                 level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of `statistic` over cases.

    data: one sequence of per-case values, or a tuple of equally long sequences that are resampled
    together (same case indices). statistic: takes one (resamples, n) array per column and reduces
    the last axis (see mean, ratio_of_means). Returns (low, high); (nan, nan) without cases.
    """
    cols = [np.asarray(c, dtype=np.float64) for c in (data if isinstance(data, tuple) else (data,))]
    n = len(cols[0])
    if any(c.ndim != 1 or len(c) != n for c in cols):
        raise ValueError(f"paired columns must be 1-D and equally long, got shapes {[c.shape for c in cols]}")
    if not 0 < level < 1:
        raise ValueError(f"level {level} must lie in (0, 1)")
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, resamples, CHUNK):
        idx = rng.integers(0, n, size=(min(CHUNK, resamples - start), n))
        values.append(statistic(*(c[idx] for c in cols)))
    values = np.concatenate(values)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
