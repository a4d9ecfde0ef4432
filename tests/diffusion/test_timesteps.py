import math

import pytest
import torch

from dimoe.diffusion import TIMESTEP_KINDS, sample_timesteps, t_to_bucket


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", TIMESTEP_KINDS)
def test_samplers_are_deterministic_by_seed(kind: str) -> None:
    kwargs = {"num_buckets": 4} if kind == "stratified" else {}
    first = sample_timesteps(kind, 32, _gen(7), **kwargs)
    again = sample_timesteps(kind, 32, _gen(7), **kwargs)
    other = sample_timesteps(kind, 32, _gen(8), **kwargs)
    assert first.dtype == torch.float32 and first.shape == (32,)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("uniform", {}),
        ("band", {"t_min": 0.6, "t_max": 0.9}),
        ("stratified", {"num_buckets": 5, "t_min": 0.2, "t_max": 0.7}),
        ("logit_normal", {"mean": 1.0, "std": 2.0, "t_min": 0.5, "t_max": 1.0}),
    ],
)
def test_samplers_stay_in_range(kind: str, kwargs: dict) -> None:
    t = sample_timesteps(kind, 4000, _gen(0), **kwargs)
    lo, hi = kwargs.get("t_min", 0.0), kwargs.get("t_max", 1.0)
    assert float(t.min()) >= lo and float(t.max()) <= hi
    # The draws actually spread over the band instead of collapsing onto a point.
    assert float(t.max() - t.min()) > 0.5 * (hi - lo)


@pytest.mark.parametrize(("batch", "buckets", "t_min", "t_max"), [(64, 8, 0.0, 1.0), (30, 3, 0.5, 1.0)])
def test_stratified_gives_every_bucket_an_equal_share(
    batch: int, buckets: int, t_min: float, t_max: float
) -> None:
    for seed in range(20):
        t = sample_timesteps("stratified", batch, _gen(seed), num_buckets=buckets, t_min=t_min, t_max=t_max)
        counts = torch.bincount(t_to_bucket(t, buckets, t_min, t_max), minlength=buckets)
        assert counts.tolist() == [batch // buckets] * buckets


def test_stratified_shares_differ_by_at_most_one_when_batch_is_not_a_multiple() -> None:
    t = sample_timesteps("stratified", 10, _gen(3), num_buckets=4)
    counts = torch.bincount(t_to_bucket(t, 4), minlength=4)
    assert int(counts.sum()) == 10
    assert sorted(counts.tolist()) == [2, 2, 3, 3]


def test_stratified_is_antithetic_with_one_shared_offset() -> None:
    # With K | B the draws are (perm_i + u) / B for one u: sorted, they are exactly 1/B apart.
    t = sample_timesteps("stratified", 16, _gen(5), num_buckets=4).sort().values
    gaps = t[1:] - t[:-1]
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / 16), atol=1e-6)
    assert 0.0 <= float(t[0]) < 1 / 16


def test_stratified_rows_are_shuffled() -> None:
    t = sample_timesteps("stratified", 64, _gen(1), num_buckets=8)
    assert not torch.equal(t, t.sort().values)


def test_logit_normal_median_follows_the_mean() -> None:
    t = sample_timesteps("logit_normal", 4000, _gen(2), mean=2.0, std=0.5)
    assert abs(float(t.median()) - 1 / (1 + math.exp(-2.0))) < 0.01
    squashed = sample_timesteps("logit_normal", 4000, _gen(2), mean=2.0, std=0.5, t_min=0.5, t_max=1.0)
    assert torch.allclose(squashed, 0.5 + 0.5 * t, atol=1e-6)


def test_t_to_bucket_hand_values() -> None:
    t = torch.tensor([0.0, 0.24, 0.25, 0.5, 0.99, 1.0])
    assert t_to_bucket(t, 4).tolist() == [0, 0, 1, 2, 3, 3]
    assert t_to_bucket(torch.tensor([0.5, 0.74, 0.76, 1.0, 0.2]), 2, 0.5, 1.0).tolist() == [0, 0, 1, 1, 0]
    assert t_to_bucket(t, 1).tolist() == [0] * 6


def test_bad_arguments_name_the_problem() -> None:
    with pytest.raises(ValueError, match="use kind 'band'"):
        sample_timesteps("uniform", 4, _gen(0), t_min=0.5)
    with pytest.raises(ValueError, match="unknown timestep kind 'cosine'"):
        sample_timesteps("cosine", 4, _gen(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="t_min < t_max"):
        sample_timesteps("band", 4, _gen(0), t_min=0.8, t_max=0.2)
    with pytest.raises(ValueError, match="num_buckets"):
        sample_timesteps("stratified", 4, _gen(0), num_buckets=0)
    with pytest.raises(ValueError, match="std"):
        sample_timesteps("logit_normal", 4, _gen(0), std=0.0)
