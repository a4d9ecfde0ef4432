import pytest
import torch

from dimoe.diffusion import (
    complementary_views,
    eligible_positions,
    independent_views,
    mask_probability,
    mask_tokens,
    single_view,
)

MASK_ID = 99
IMAGE, PROMPT, RESPONSE, PAD = 0, 1, 2, 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layout(batch: int = 6) -> torch.Tensor:
    """Token roles Long[B, 16]: 4 image, 4 prompt, 3 + i % 4 response tokens, then padding."""
    roles = torch.full((batch, 16), PAD)
    roles[:, :4] = IMAGE
    roles[:, 4:8] = PROMPT
    for i in range(batch):
        roles[i, 8 : 8 + 3 + i % 4] = RESPONSE
    return roles


def _ids(roles: torch.Tensor) -> torch.Tensor:
    return torch.arange(roles.numel()).reshape(roles.shape) % 50 + 1


def test_mask_probability_hand_values() -> None:
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(mask_probability(t, eps=0.1), torch.tensor([0.1, 0.55, 1.0]))
    assert torch.allclose(mask_probability(t), torch.tensor([1e-3, 0.5005, 1.0]))


def test_eligible_with_ratio_zero_is_exactly_the_response() -> None:
    roles = _layout()
    eligible = eligible_positions(roles == RESPONSE, roles == PROMPT, 0.0, _gen(0))
    assert torch.equal(eligible, roles == RESPONSE)


def test_eligible_with_ratio_one_adds_all_prompt_text_never_image_or_pad() -> None:
    roles = _layout()
    eligible = eligible_positions(roles == RESPONSE, roles == PROMPT, 1.0, _gen(0))
    assert torch.equal(eligible, (roles == RESPONSE) | (roles == PROMPT))


def test_include_prompt_ratio_fraction_is_approximately_right() -> None:
    roles = torch.full((200, 100), PROMPT)
    roles[:, 80:] = RESPONSE
    roles[:, :10] = IMAGE
    eligible = eligible_positions(roles == RESPONSE, roles == PROMPT, 0.3, _gen(1))
    prompt_fraction = eligible[roles == PROMPT].float().mean()
    assert abs(float(prompt_fraction) - 0.3) < 0.015
    assert bool(eligible[roles == RESPONSE].all())
    assert not bool(eligible[roles == IMAGE].any())


def test_eligible_rejects_bad_ratio() -> None:
    roles = _layout()
    with pytest.raises(ValueError, match="include_prompt_ratio"):
        eligible_positions(roles == RESPONSE, roles == PROMPT, 1.5, _gen(0))


def test_mask_tokens_masks_only_eligible_at_rate_p() -> None:
    ids = torch.randint(1, 50, (4, 2000), generator=_gen(0))
    eligible = torch.zeros(4, 2000, dtype=torch.bool)
    eligible[:, :1000] = True
    p = torch.tensor([0.0, 0.25, 0.75, 1.0])
    noisy, masked = mask_tokens(ids, eligible, p, MASK_ID, _gen(1))
    assert not bool((masked & ~eligible).any())
    assert torch.equal(noisy[masked], torch.full((int(masked.sum()),), MASK_ID))
    assert torch.equal(noisy[~masked], ids[~masked])
    rates = masked[:, :1000].float().mean(dim=1)
    assert rates[0] == 0.0 and rates[3] == 1.0
    assert abs(float(rates[1]) - 0.25) < 0.04 and abs(float(rates[2]) - 0.75) < 0.04


def test_mask_tokens_validates_p() -> None:
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        mask_tokens(ids, ids.bool(), torch.tensor([0.5]), MASK_ID, _gen(0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_tokens(ids, ids.bool(), torch.tensor([0.5, 1.5]), MASK_ID, _gen(0))


def test_complementary_views_cover_every_eligible_token_exactly_once() -> None:
    roles = _layout()
    ids = _ids(roles)
    eligible = eligible_positions(roles == RESPONSE, roles == PROMPT, 0.0, _gen(0))
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.97])
    views = complementary_views(ids, eligible, t, MASK_ID, _gen(1), num_buckets=4)
    batch = ids.shape[0]
    masked_a, masked_b = views.masked[:batch], views.masked[batch:]
    assert not bool((masked_a & masked_b).any())
    assert torch.equal(masked_a | masked_b, eligible)
    # Image, prompt (ratio 0) and pad tokens are untouched in both views.
    for view in (views.noisy_ids[:batch], views.noisy_ids[batch:]):
        assert torch.equal(view[~eligible], ids[~eligible])
    # Problem D disappears: every sample has at least one supervised token across its pair.
    assert bool(((masked_a | masked_b).sum(dim=1) > 0).all())


def test_complementary_views_metadata() -> None:
    roles = _layout(4)
    ids = _ids(roles)
    eligible = roles == RESPONSE
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    views = complementary_views(ids, eligible, t, MASK_ID, _gen(1), num_buckets=4, eps=0.01)
    assert views.num_views == 2 and views.noisy_ids.shape == (8, 16)
    assert torch.allclose(views.t, torch.tensor([0.1, 0.3, 0.6, 0.9, 0.9, 0.7, 0.4, 0.1]))
    expected_p = 0.99 * torch.tensor([0.1, 0.3, 0.6, 0.9, 0.9, 0.7, 0.4, 0.1]) + 0.01
    assert torch.allclose(views.p, expected_p)
    assert views.bucket.tolist() == [0, 1, 2, 3, 3, 2, 1, 0]
    assert views.view.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert torch.equal(views.eligible, eligible.repeat(2, 1))
    assert torch.equal(views.answer_lengths, eligible.sum(dim=1).repeat(2))
    # Realised ratios of a pair sum to one because the two masks split the eligible tokens.
    assert torch.allclose(views.mask_ratio[:4] + views.mask_ratio[4:], torch.ones(4))


def test_view_b_realised_ratio_tracks_one_minus_p_a() -> None:
    ids = torch.randint(1, 50, (3, 4000), generator=_gen(0))
    eligible = torch.ones_like(ids, dtype=torch.bool)
    t = torch.tensor([0.2, 0.5, 0.8])
    views = complementary_views(ids, eligible, t, MASK_ID, _gen(2))
    assert torch.allclose(views.mask_ratio[3:], 1 - mask_probability(t), atol=0.03)


def test_visible_in_both_is_the_real_context_for_complementary_views() -> None:
    roles = _layout()
    ids = _ids(roles)
    eligible = roles == RESPONSE
    real = roles != PAD
    views = complementary_views(ids, eligible, torch.full((6,), 0.5), MASK_ID, _gen(3))
    assert torch.equal(views.visible_in_both(real), real & ~eligible)
    assert torch.equal(views.visible(real), real.repeat(2, 1) & ~views.masked)


def test_independent_views_are_independent_draws() -> None:
    ids = torch.randint(1, 50, (2, 3000), generator=_gen(0))
    eligible = torch.ones_like(ids, dtype=torch.bool)
    eligible[:, :100] = False
    t_a = torch.tensor([0.5, 0.7])
    views = independent_views(ids, eligible, t_a, 1 - t_a, MASK_ID, _gen(4))
    masked_a, masked_b = views.masked[:2], views.masked[2:]
    assert not bool(((masked_a | masked_b) & ~eligible).any())
    # Independent masks overlap at about p_a * p_b, unlike complementary ones which never overlap.
    overlap = (masked_a & masked_b)[:, 100:].float().mean(dim=1)
    p = mask_probability(torch.tensor([0.5, 0.7, 0.5, 0.3]))
    assert torch.allclose(overlap, p[:2] * p[2:], atol=0.03)
    assert torch.allclose(views.t, torch.tensor([0.5, 0.7, 0.5, 0.3]))


def test_views_are_deterministic_by_seed() -> None:
    roles = _layout()
    ids, eligible, t = _ids(roles), roles == RESPONSE, torch.full((6,), 0.5)
    first = complementary_views(ids, eligible, t, MASK_ID, _gen(5))
    again = complementary_views(ids, eligible, t, MASK_ID, _gen(5))
    other = complementary_views(ids, eligible, t, MASK_ID, _gen(6))
    assert torch.equal(first.masked, again.masked)
    assert not torch.equal(first.masked, other.masked)


def test_single_view() -> None:
    roles = _layout()
    ids = _ids(roles)
    eligible = roles == RESPONSE
    view = single_view(ids, eligible, torch.ones(6), MASK_ID, _gen(0), num_buckets=2)
    assert view.num_views == 1 and view.bucket.tolist() == [1] * 6
    assert torch.equal(view.masked, eligible)  # p(1) = 1 masks every eligible token
    with pytest.raises(ValueError, match="two-view"):
        view.visible_in_both(roles != PAD)
