"""The statistics behind the A–F diagnostics (docs/design.md §4), on plain numpy arrays, and the
means of logged series (None for steps where a metric is undefined).

Entropies and divergences are in bits (log base 2), so JS divergence and NMI lie in [0, 1].
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike


def _distribution(values: ArrayLike) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    total = array.sum()
    if total <= 0 or (array < 0).any():
        raise ValueError("a distribution needs non-negative weights with a positive sum")
    return array / total


def entropy(values: ArrayLike) -> float:
    """Shannon entropy H(p) = -Σ p_i log2 p_i of the normalised weights (0 log 0 = 0)."""
    p = _distribution(values)
    nonzero = p[p > 0]
    return float(-(nonzero * np.log2(nonzero)).sum())


def kl_divergence(p: ArrayLike, q: ArrayLike) -> float:
    """KL(p ‖ q) = Σ p_i log2(p_i / q_i) in bits; terms with p_i = 0 contribute 0."""
    p, q = _distribution(p), _distribution(q)
    support = p > 0
    if (q[support] == 0).any():
        return float("inf")
    return float((p[support] * np.log2(p[support] / q[support])).sum())


def js_divergence(p: ArrayLike, q: ArrayLike) -> float:
    """Jensen–Shannon divergence JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m), m = ½ (p + q), in bits:
    0 for equal distributions, 1 for disjoint supports. Inputs are normalised first."""
    p, q = _distribution(p), _distribution(q)
    m = 0.5 * (p + q)
    return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)


def mutual_information(counts: ArrayLike) -> float:
    """I(X; Y) = Σ p(x, y) log2 (p(x, y) / (p(x) p(y))) of a contingency table `counts[x, y]`."""
    joint = _distribution(counts)
    px, py = joint.sum(axis=1), joint.sum(axis=0)
    support = joint > 0
    ratio = joint[support] / np.outer(px, py)[support]
    return float((joint[support] * np.log2(ratio)).sum())


def normalized_mutual_information(counts: ArrayLike) -> float:
    """NMI(X; Y) = 2 I(X; Y) / (H(X) + H(Y)) (arithmetic-mean normalisation) of a contingency
    table `counts[x, y]` of co-occurrence counts; in [0, 1], 1 when each variable determines the
    other. Defined as 0 when both marginals are deterministic (nothing to explain)."""
    joint = _distribution(counts)
    denominator = entropy(joint.sum(axis=1)) + entropy(joint.sum(axis=0))
    if denominator <= 0:
        return 0.0
    return float(np.clip(2.0 * mutual_information(joint) / denominator, 0.0, 1.0))


def coefficient_of_variation(values: ArrayLike) -> float:
    """CV = σ / μ with the population standard deviation; 0 when all values are equal.
    Raises ValueError when the mean is 0 (CV undefined)."""
    array = np.asarray(values, dtype=np.float64)
    mean = array.mean()
    if mean <= 0:
        raise ValueError("the coefficient of variation needs a positive mean")
    return float(array.std() / mean)


def gini(values: ArrayLike) -> float:
    """Gini coefficient G = Σ_i Σ_j |x_i - x_j| / (2 n² μ) of non-negative values: 0 when all are
    equal, (n - 1) / n when one value holds everything. Raises ValueError when the mean is 0."""
    array = np.sort(np.asarray(values, dtype=np.float64))
    n, mean = array.size, array.mean()
    if mean <= 0 or (array < 0).any():
        raise ValueError("the Gini coefficient needs non-negative values with a positive mean")
    # For sorted x, Σ_i Σ_j |x_i - x_j| = 2 Σ_i (2i - n + 1) x_i (i from 0): O(n log n), no n² matrix.
    ranks = np.arange(n)
    return float(2.0 * ((2 * ranks - n + 1) * array).sum() / (2.0 * n * n * mean))


def series_mean(values: list[float | None]) -> float | None:
    """Mean of the defined values of a series; None when none is defined or the mean is not finite
    (summaries are JSON, which has no NaN or infinity)."""
    defined = [value for value in values if value is not None]
    if not defined:
        return None
    mean = sum(defined) / len(defined)
    return mean if math.isfinite(mean) else None
