"""The report's statistics: mean ± std over seeds, paired 95% t-intervals, claim verdicts."""

from __future__ import annotations

import math
import numbers

import numpy as np


def t_quantile_975(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom.

    Args:
        df: degrees of freedom, at least 1.

    Returns:
        ``t_{0.975, df}`` from ``scipy.stats.t.ppf``.

    Raises:
        ValueError: if ``df`` is not a whole number of at least 1.
    """
    if not isinstance(df, numbers.Integral) or isinstance(df, bool) or df < 1:
        raise ValueError(f"df: expected an int of at least 1, got {df!r}")
    from scipy import stats  # here, not at import: workers that only train never load scipy

    return float(stats.t.ppf(0.975, int(df)))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value).

    Args:
        values: non-empty list of numbers.

    Returns:
        ``(mean, std)``.

    Raises:
        ValueError: if ``values`` is empty.
    """
    if len(values) == 0:
        raise ValueError("values: must not be empty")
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def paired_interval(differences: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences with a 95% t-interval.

    Args:
        differences: per-seed differences, non-empty.

    Returns:
        ``(mean, low, high)``; ``low``/``high`` are NaN for a single pair.

    Raises:
        ValueError: if ``differences`` is empty.
    """
    if len(differences) == 0:
        raise ValueError("differences: must not be empty")
    mean, std = mean_std(differences)
    n = len(differences)
    if n < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return mean, mean - half, mean + half


def claim_verdict(differences: list[float], direction: int) -> str:
    """One-word-plus-reason verdict for a claim from paired differences.

    Args:
        differences: per-seed ``EL − CE`` differences.
        direction: +1 if the claim says the difference is positive, -1 if negative.

    Returns:
        ``"holds"`` when the 95% interval lies on the claimed side of 0, else ``"does not hold"``
        with the reason.

    Raises:
        ValueError: if ``direction`` is not +1 or -1.
    """
    if direction not in (-1, 1):
        raise ValueError(f"direction: expected +1 or -1, got {direction!r}")
    if not differences:
        return "not measured (no finished pair of runs)"
    mean, low, high = paired_interval(differences)
    if len(differences) < 2:
        side = "holds" if mean * direction > 0 else "does not hold"
        return f"{side} (single seed, no interval)"
    if direction * low > 0 and direction * high > 0:
        return "holds"
    if mean * direction > 0:
        return "does not hold (right direction, but the 95% interval includes 0)"
    return "does not hold (opposite direction)"
