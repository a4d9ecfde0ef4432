"""P-POTS: an importance sampler of the noise level t for masked-diffusion training (StableDLLM,
arXiv:2511.18159; the facts are summarised in docs/design.md §4).

The training loss is L = E_{t ~ U[a, b]} E_{x, mask} [l(x, mask, t)]. Sampling t from a proposal
q and weighting each row by u(t) / q(t) (u the uniform density of the band) keeps the estimate
unbiased; the variance of one draw is smallest for

    q*(t) ∝ w(t) = sqrt(E[l² | t]) = sqrt(v(t) + m(t)²),

with m(t) and v(t) the mean and variance of the per-row weighted loss at t over rows and masks.
`loss_moments` estimates m and v on a grid of t from the current model's per-row losses, and
`fit_proposal` turns w into a sampler: `smoothed` (w smoothed over neighbouring grid points) or
`beta` (a Beta(α, β) with w's mean and variance), mixed with a little of the uniform density so
that no weight exceeds 1 / `uniform_mix`. Sampling is by inverse CDF, linear between the nodes of
a fine grid; the weight uses the density that sampling really has (constant between nodes), so it
is exact, and `max_is_weight` clamps it (the only source of bias, counted by `clamped_fraction`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

PModel = Literal["smoothed", "beta"]
P_MODELS: tuple[str, ...] = ("smoothed", "beta")
FINE_NODES = 1024  # nodes of the piecewise-linear CDF the sampler inverts


@dataclass(frozen=True)
class Proposal:
    """A density q on [t_min, t_max], piecewise constant between `nodes` (its CDF is linear there)."""

    nodes: torch.Tensor  # Float64[F + 1], t_min .. t_max
    cdf: torch.Tensor  # Float64[F + 1], 0 .. 1 at the nodes
    max_is_weight: float

    @property
    def t_min(self) -> float:
        return float(self.nodes[0])

    @property
    def t_max(self) -> float:
        return float(self.nodes[-1])

    def density(self, t: torch.Tensor) -> torch.Tensor:
        """q(t), Float64 like `t`'s shape."""
        cell = torch.searchsorted(self.nodes, t.double().contiguous(), right=True).clamp(
            1, len(self.nodes) - 1
        )
        width = self.nodes[cell] - self.nodes[cell - 1]
        return (self.cdf[cell] - self.cdf[cell - 1]) / width

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """t ~ q by inverse CDF; Float32[B]."""
        u = torch.rand(batch_size, generator=generator, device=generator.device, dtype=torch.float64)
        cell = torch.searchsorted(self.cdf, u.cpu(), right=True).clamp(1, len(self.cdf) - 1)
        low, high = self.cdf[cell - 1], self.cdf[cell]
        share = (u.cpu() - low) / (high - low).clamp(min=1e-300)
        t = self.nodes[cell - 1] + share * (self.nodes[cell] - self.nodes[cell - 1])
        return t.float().to(generator.device)

    def _ratio(self, t: torch.Tensor) -> torch.Tensor:
        """u(t) / q(t), u the uniform density of the band; Float64."""
        return (1.0 / (self.t_max - self.t_min)) / self.density(t)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """The importance weight u(t) / q(t) of each t, clamped at `max_is_weight`; Float32."""
        return self._ratio(t).clamp(max=self.max_is_weight).float().to(t.device)

    def clamped_fraction(self) -> float:
        """The probability under q of a weight the clamp lowers (0: the estimate is unbiased)."""
        clamped = self._ratio((self.nodes[1:] + self.nodes[:-1]) / 2) > self.max_is_weight
        return float(((self.cdf[1:] - self.cdf[:-1]) * clamped).sum())


def loss_moments(
    row_losses: Callable[[float], torch.Tensor], grid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """m(t) and v(t) on `grid`: the mean and variance of `row_losses(t)` (the per-row weighted
    noisy losses of a few rows × masks at t, any shape) at each grid point."""
    means, variances = [], []
    for t in grid.tolist():
        losses = row_losses(t).detach().double().flatten()
        means.append(losses.mean())
        variances.append(
            losses.var(correction=1) if losses.numel() > 1 else torch.zeros((), dtype=torch.float64)
        )
    return torch.stack(means), torch.stack(variances)


def optimal_shape(means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """w(t) = sqrt(v(t) + m(t)²), the shape of the variance-minimising proposal."""
    return (variances.double() + means.double() ** 2).clamp(min=0).sqrt()


def fit_proposal(
    grid: torch.Tensor,
    shape: torch.Tensor,
    *,
    p_model: PModel = "smoothed",
    t_min: float = 0.0,
    t_max: float = 1.0,
    uniform_mix: float = 0.05,
    max_is_weight: float = 10.0,
    smoothing: int = 1,
) -> Proposal:
    """The proposal q ∝ (1 - uniform_mix) fit(w) + uniform_mix on [t_min, t_max] from w on `grid`.

    `smoothed`: w averaged over ±`smoothing` grid neighbours, linear between grid points and flat
    beyond the outer ones; `beta`: a Beta density with the mean and variance of w read as a
    density of t over the band."""
    if p_model not in P_MODELS:
        raise ValueError(f"unknown p_model {p_model!r}; expected one of {', '.join(P_MODELS)}")
    if not 0.0 < uniform_mix <= 1.0:
        raise ValueError(f"uniform_mix must be in (0, 1], got {uniform_mix}")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
    nodes = torch.linspace(t_min, t_max, FINE_NODES + 1, dtype=torch.float64)
    mids = (nodes[1:] + nodes[:-1]) / 2
    if p_model == "smoothed":
        fitted = _interpolate(grid.double(), _smooth(shape.double(), smoothing), mids)
    else:
        band = t_max - t_min
        fitted = _beta_density((grid.double() - t_min) / band, shape.double(), (mids - t_min) / band)
    fitted = fitted.clamp(min=0)
    total = fitted.sum()
    fitted = fitted / total if total > 0 else torch.full_like(mids, 1.0 / len(mids))
    mass = (1.0 - uniform_mix) * fitted + uniform_mix / len(mids)  # each fine cell's probability
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(mass, 0)])
    return Proposal(nodes, cdf / cdf[-1], max_is_weight)


def _smooth(values: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0 or len(values) < 2:
        return values
    padded = torch.cat([values[:1].repeat(radius), values, values[-1:].repeat(radius)])
    return padded.unfold(0, 2 * radius + 1, 1).mean(dim=1)


def _interpolate(grid: torch.Tensor, values: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Linear between grid points, flat beyond the outer ones."""
    cell = torch.searchsorted(grid, at.contiguous()).clamp(1, len(grid) - 1)
    low, high = grid[cell - 1], grid[cell]
    share = ((at - low) / (high - low)).clamp(0, 1)
    return values[cell - 1] + share * (values[cell] - values[cell - 1])


def _beta_density(s_grid: torch.Tensor, shape: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Beta(α, β) on s in (0, 1), by the method of moments of `shape` read as a density on
    `s_grid` (the grid as positions in the band, like `s`)."""
    s_grid = s_grid.clamp(1e-3, 1 - 1e-3)
    weights = shape / shape.sum()
    mean = (weights * s_grid).sum()
    var = (weights * (s_grid - mean) ** 2).sum().clamp(min=1e-6)
    common = (mean * (1 - mean) / var - 1).clamp(min=1e-2)
    alpha, beta = mean * common, (1 - mean) * common
    log_pdf = (alpha - 1) * torch.log(s) + (beta - 1) * torch.log1p(-s)
    return torch.exp(log_pdf - log_pdf.max())
