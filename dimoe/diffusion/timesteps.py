"""Timestep samplers for the masked-diffusion forward process.

Every sampler draws from an explicit ``torch.Generator`` (tensors live on the generator's device),
so a fixed seed reproduces the batch of timesteps exactly.

Kinds:
- ``uniform``: t ~ U[0, 1) (the LLaDA pre-training schedule).
- ``band``: t ~ U[t_min, t_max) (a stage's noise band, e.g. the high-t band of ``stage3_lownfe``).
- ``stratified``: antithetic stratified draw over ``num_buckets`` equal buckets of [t_min, t_max).
  Each bucket receives ``B // K`` samples, plus one for ``B % K`` buckets picked at random, so
  every bucket gets an equal share when B is a multiple of K. Inside bucket k holding n_k samples,
  sample j sits at ``(k + (j + u) / n_k) / K`` with ONE offset u shared by the whole batch; when K
  divides B this is the low-discrepancy sampler ``t_i = (perm_i + u) / B``. Rows are shuffled so
  that a row's position does not reveal its bucket.
- ``logit_normal``: t = sigmoid(mean + std * z), z ~ N(0, 1), squashed into [t_min, t_max].
"""

from __future__ import annotations

from typing import Literal

import torch

TimestepKind = Literal["uniform", "band", "stratified", "logit_normal"]
TIMESTEP_KINDS: tuple[str, ...] = ("uniform", "band", "stratified", "logit_normal")

# The shared stratified offset is kept this many stratum-widths away from the stratum edges: the
# sampler works in float64 and returns float32, and a draw rounded onto a bucket boundary would be
# counted in the neighbouring bucket by `t_to_bucket`, breaking the equal-share guarantee.
_STRATUM_MARGIN = 1e-3


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _check_band(t_min: float, t_max: float) -> None:
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")


def _check_buckets(num_buckets: int) -> None:
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")


def _into_band(s: torch.Tensor, t_min: float, t_max: float) -> torch.Tensor:
    """Map s in [0, 1] affinely onto [t_min, t_max] and return float32."""
    return (t_min + (t_max - t_min) * s).float()


def uniform(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """t ~ U[0, 1), shape [B], float32."""
    _check_batch(batch_size)
    return torch.rand(batch_size, generator=generator, device=generator.device)


def band(batch_size: int, generator: torch.Generator, t_min: float, t_max: float) -> torch.Tensor:
    """t ~ U[t_min, t_max), shape [B], float32."""
    _check_batch(batch_size)
    _check_band(t_min, t_max)
    s = torch.rand(batch_size, generator=generator, device=generator.device, dtype=torch.float64)
    return _into_band(s, t_min, t_max)


def stratified(
    batch_size: int,
    generator: torch.Generator,
    num_buckets: int,
    t_min: float = 0.0,
    t_max: float = 1.0,
) -> torch.Tensor:
    """Antithetic stratified t over ``num_buckets`` equal buckets of [t_min, t_max) (see module doc)."""
    _check_batch(batch_size)
    _check_buckets(num_buckets)
    _check_band(t_min, t_max)
    device = generator.device
    counts = torch.full((num_buckets,), batch_size // num_buckets, dtype=torch.long, device=device)
    extra = torch.randperm(num_buckets, generator=generator, device=device)[: batch_size % num_buckets]
    counts[extra] += 1
    bucket = torch.repeat_interleave(torch.arange(num_buckets, device=device), counts)
    first_row = torch.cumsum(counts, 0) - counts
    rank = torch.arange(batch_size, device=device) - first_row[bucket]
    u = torch.rand(1, generator=generator, device=device, dtype=torch.float64)
    u = _STRATUM_MARGIN + (1.0 - 2.0 * _STRATUM_MARGIN) * u
    s = (bucket + (rank + u) / counts[bucket]) / num_buckets
    shuffle = torch.randperm(batch_size, generator=generator, device=device)
    return _into_band(s[shuffle], t_min, t_max)


def logit_normal(
    batch_size: int,
    generator: torch.Generator,
    mean: float = 0.0,
    std: float = 1.0,
    t_min: float = 0.0,
    t_max: float = 1.0,
) -> torch.Tensor:
    """t = t_min + (t_max - t_min) * sigmoid(mean + std * z), z ~ N(0, 1); shape [B], float32."""
    _check_batch(batch_size)
    _check_band(t_min, t_max)
    if std <= 0:
        raise ValueError(f"logit_normal std must be > 0, got {std}")
    z = torch.randn(batch_size, generator=generator, device=generator.device, dtype=torch.float64)
    return _into_band(torch.sigmoid(mean + std * z), t_min, t_max)


def sample_timesteps(
    kind: TimestepKind,
    batch_size: int,
    generator: torch.Generator,
    *,
    num_buckets: int = 1,
    t_min: float = 0.0,
    t_max: float = 1.0,
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """Draw a FloatTensor[B] of diffusion timesteps with the sampler named by ``kind``.

    ``uniform`` is always the full [0, 1) range: asking for it with a narrower band is a config
    mistake (use ``band``), so it raises instead of silently ignoring the band.
    """
    if kind == "uniform":
        if (t_min, t_max) != (0.0, 1.0):
            raise ValueError(
                f"timestep kind 'uniform' covers [0, 1) but t_min={t_min}, t_max={t_max} were given; "
                "use kind 'band' (or 'stratified') to restrict t to a band"
            )
        return uniform(batch_size, generator)
    if kind == "band":
        return band(batch_size, generator, t_min, t_max)
    if kind == "stratified":
        return stratified(batch_size, generator, num_buckets, t_min, t_max)
    if kind == "logit_normal":
        return logit_normal(batch_size, generator, mean, std, t_min, t_max)
    raise ValueError(f"unknown timestep kind {kind!r}; expected one of {', '.join(TIMESTEP_KINDS)}")


def t_to_bucket(t: torch.Tensor, num_buckets: int, t_min: float = 0.0, t_max: float = 1.0) -> torch.Tensor:
    """Index of the equal-width bucket of [t_min, t_max] containing each t; LongTensor[B].

    Bucket k is [t_min + k w, t_min + (k + 1) w) with w = (t_max - t_min) / num_buckets; values at
    or beyond the edges are clamped into the first / last bucket (t = t_max belongs to the last).
    """
    _check_buckets(num_buckets)
    _check_band(t_min, t_max)
    s = (t.double() - t_min) / (t_max - t_min)
    return torch.floor(s * num_buckets).long().clamp_(0, num_buckets - 1)
