"""Hand-computed cases of the statistics behind the A–F diagnostics."""

import math

import numpy as np
import pytest

from dimoe.diag.routing import layer_nonstationarity, layer_specialisation
from dimoe.diag.stats import (
    coefficient_of_variation,
    entropy,
    gini,
    js_divergence,
    normalized_mutual_information,
)


def test_js_divergence_hand_computed() -> None:
    assert js_divergence([0.3, 0.7], [0.3, 0.7]) == pytest.approx(0.0)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint supports: 1 bit
    # m = (.75, .25): ½ log2(1/.75) + ½ (½ log2(.5/.75) + ½ log2(.5/.25)) = 0.311278
    assert js_divergence([1, 0], [0.5, 0.5]) == pytest.approx(0.311278, abs=1e-6)
    assert js_divergence([2, 0], [1, 1]) == pytest.approx(0.311278, abs=1e-6)  # normalised first
    assert js_divergence([0.2, 0.8], [0.6, 0.4]) == pytest.approx(js_divergence([0.6, 0.4], [0.2, 0.8]))


def test_entropy_and_nmi_hand_computed() -> None:
    assert entropy([0.25] * 4) == pytest.approx(2.0)
    assert normalized_mutual_information([[5, 0], [0, 5]]) == pytest.approx(1.0)
    assert normalized_mutual_information([[1, 1], [1, 1]]) == pytest.approx(0.0)
    # p(x) = (.5, .5), p(y) = (.75, .25): I = .5 log2(4/3) + .25 log2(2/3) + .25 log2 2 = 0.311278,
    # H(X) = 1, H(Y) = 0.811278, NMI = 2 I / (H(X) + H(Y)) = 0.343711
    assert normalized_mutual_information([[2, 0], [1, 1]]) == pytest.approx(0.343711, abs=1e-6)
    assert normalized_mutual_information([[7, 0], [0, 0]]) == 0.0  # both marginals deterministic


def test_cv_and_gini_hand_computed() -> None:
    # mean 2.5, population std sqrt(1.25); Σ|x_i - x_j| = 20 over ordered pairs, / (2 · 16 · 2.5)
    assert coefficient_of_variation([1, 2, 3, 4]) == pytest.approx(math.sqrt(1.25) / 2.5)
    assert gini([1, 2, 3, 4]) == pytest.approx(0.25)
    assert gini([4, 1, 3, 2]) == pytest.approx(0.25)  # order does not matter
    assert gini([0, 0, 0, 1]) == pytest.approx(0.75)  # (n - 1) / n
    assert coefficient_of_variation([0, 0, 0, 1]) == pytest.approx(math.sqrt(3))
    assert gini([3, 3, 3]) == 0.0 and coefficient_of_variation([3, 3, 3]) == 0.0
    with pytest.raises(ValueError, match="positive mean"):
        gini([0, 0])


def test_nonstationarity_weights_buckets_by_tokens_and_skips_empty_ones() -> None:
    load = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    # Bucket 1 is empty; mean = (10·[1,0] + 30·[0,1]) / 40 = [.25, .75].
    tokens = np.array([10.0, 0.0, 30.0])
    expected = (js_divergence([1, 0], [0.25, 0.75]) + js_divergence([0, 1], [0.25, 0.75])) / 2
    assert layer_nonstationarity(load, tokens) == pytest.approx(expected)
    assert layer_nonstationarity(np.array([[0.5, 0.5], [0.5, 0.5]]), np.array([3.0, 9.0])) == pytest.approx(
        0.0
    )
    assert layer_nonstationarity(np.zeros((2, 2)), np.zeros(2)) is None


def test_specialisation_compares_modality_and_t_bucket_tables() -> None:
    load = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    usage = {"image": [10, 0, 0, 0], "prompt": [0, 10, 0, 0], "response": [0, 0, 10, 10]}
    nmi_modality, nmi_bucket = layer_specialisation(load, np.array([10.0, 10.0]), usage)
    # Modality is a function of the expert: I = H(modality) = 1.5, H(expert) = 2 → 2 · 1.5 / 3.5.
    assert nmi_modality == pytest.approx(6 / 7)
    assert nmi_bucket == pytest.approx(1.0)
