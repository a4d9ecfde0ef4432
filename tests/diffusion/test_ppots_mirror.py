"""P-POTS (importance sampling of t) and MIRROR (reflected mask pairs) against closed forms and
against plain Monte Carlo on a fixed model."""

import math

import pytest
import torch

from dimoe.diffusion import mirror_views
from dimoe.diffusion.ppots import fit_proposal, loss_moments, optimal_shape


def noisy_loss(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A per-row loss with a known non-flat mean m(t) = 1 / (t + 0.05) and noise that grows as t → 0."""
    return 1.0 / (t + 0.05) * (1.0 + 0.5 * torch.randn(t.shape, generator=generator, dtype=torch.float64))


TRUE_MEAN = math.log(1.05 / 0.05)  # ∫_0^1 dt / (t + 0.05)


def fitted(p_model: str, generator: torch.Generator):
    grid = torch.linspace(1 / 24, 23 / 24, 12, dtype=torch.float64)
    means, variances = loss_moments(
        lambda t: noisy_loss(torch.full((64,), t, dtype=torch.float64), generator), grid
    )
    return fit_proposal(grid, optimal_shape(means, variances), p_model=p_model, max_is_weight=25.0)


@pytest.mark.parametrize("p_model", ["smoothed", "beta"])
def test_ppots_is_unbiased_and_lowers_the_variance_of_a_non_flat_loss(p_model):
    generator = torch.Generator().manual_seed(0)
    proposal = fitted(p_model, generator)
    assert proposal.clamped_fraction() == 0.0  # 1 / uniform_mix = 20 < 25: nothing clamped, no bias
    n = 200_000
    plain = noisy_loss(torch.rand(n, generator=generator, dtype=torch.float64), generator)
    t = proposal.sample(n, generator).double()
    weighted = proposal.weights(t).double() * noisy_loss(t, generator)
    for draws in (plain, weighted):  # both estimate ∫ m(t) dt, within 4 standard errors
        assert abs(draws.mean().item() - TRUE_MEAN) < 4 * draws.std().item() / math.sqrt(n)
    assert weighted.var() < 0.5 * plain.var()


def test_proposal_samples_follow_its_density_and_weights_are_uniform_over_it():
    generator = torch.Generator().manual_seed(1)
    proposal = fitted("smoothed", generator)
    t = proposal.sample(400_000, generator).double()
    assert 0.0 <= t.min() and t.max() <= 1.0
    # E_q[u / q] = 1, and E_q[g u / q] = ∫ g for g(t) = t² (= 1/3).
    weights = proposal.weights(t).double()
    assert weights.mean().item() == pytest.approx(1.0, abs=0.01)
    assert (weights * t**2).mean().item() == pytest.approx(1 / 3, abs=0.005)
    # More of the draws land where the loss is large (small t).
    assert (t < 0.25).double().mean() > 0.4


def test_clamping_is_reported():
    grid = torch.linspace(0.05, 0.95, 10, dtype=torch.float64)
    shape = torch.where(grid < 0.5, 100.0, 0.01).double()
    proposal = fit_proposal(grid, shape, uniform_mix=0.01, max_is_weight=5.0)
    assert proposal.clamped_fraction() > 0
    assert proposal.weights(torch.tensor([0.9])).item() == 5.0


def test_mirror_views_have_the_stated_marginal_and_negative_correlation():
    generator = torch.Generator().manual_seed(0)
    rows, length = 4, 50_000
    t = torch.tensor([0.2, 0.5, 0.7, 0.95])
    ids = torch.ones(rows, length, dtype=torch.long)
    eligible = torch.ones(rows, length, dtype=torch.bool)
    eligible[:, :10] = False  # never masked
    noised = mirror_views(ids, eligible, t, mask_token_id=9, generator=generator, eps=1e-3)
    a, b = noised.masked[:rows, 10:].double(), noised.masked[rows:, 10:].double()
    assert not noised.masked[:, :10].any()
    assert torch.equal(noised.t, torch.cat([t, t])) and torch.equal(noised.p[:rows], noised.p[rows:])
    p = noised.p[:rows].double()
    tolerance = 4 * (p * (1 - p) / (length - 10)).sqrt()
    assert ((a.mean(1) - p).abs() < tolerance).all() and ((b.mean(1) - p).abs() < tolerance).all()
    both = (a * b).mean(1)
    assert torch.allclose(both, (2 * p - 1).clamp(min=0), atol=0.01)  # P(A and B) = max(0, 2p - 1)
    # Negatively correlated: cov = max(0, 2p - 1) - p² < 0 for every p in (0, 1); independent masks: 0.
    covariance, expected = both - a.mean(1) * b.mean(1), (2 * p - 1).clamp(min=0) - p**2
    assert (expected < 0).all() and torch.allclose(covariance, expected, atol=0.005)
