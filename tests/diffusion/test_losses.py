import math

import pytest
import torch

from dimoe.diffusion import (
    RouterPriorEMA,
    cap_confidence_loss,
    masked_diffusion_loss,
    mean_router_distribution,
    router_z_loss,
    routing_prior_loss,
    stratified_balance_loss,
    view_consistency_loss,
)


def _lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def _entropy(probs: list[float]) -> float:
    return -sum(q * math.log(q) for q in probs if q > 0)


# --------------------------------------------------------------------------- masked diffusion loss


def _tiny_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B=2, L=3, V=3. Masked: (0,0), (0,1), (1,0). Unmasked positions carry junk logits."""
    logits = torch.tensor(
        [
            [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [9.0, -9.0, 0.0]],
            [[0.0, 0.0, 0.0], [5.0, 5.0, 5.0], [-3.0, 4.0, 1.0]],
        ],
        requires_grad=True,
    )
    targets = torch.tensor([[0, 2, 1], [1, 0, 0]])
    masked = torch.tensor([[True, True, False], [True, False, False]])
    return logits, targets, masked


# Hand-computed CE = logsumexp(logits) - logits[target] of the three masked tokens.
CE00 = _lse(2, 0, 0) - 2
CE01 = _lse(0, 1, 0) - 0
CE10 = _lse(0, 0, 0) - 0
P = torch.tensor([0.5, 0.25])
LENGTHS = torch.tensor([3, 2])


@pytest.mark.parametrize(
    ("weight", "norm", "expected"),
    [
        ("uniform", "token", (CE00 + CE01 + CE10) / 3),
        ("elbo", "token", (2 * (CE00 + CE01) + 4 * CE10) / 3),
        ("elbo", "sequence", (2 * (CE00 + CE01) / 3 + 4 * CE10 / 2) / 2),
        ("uniform", "sequence", ((CE00 + CE01) / 3 + CE10 / 2) / 2),
        ("elbo", "batch", (2 * (CE00 + CE01) + 4 * CE10) / 5),
    ],
)
def test_masked_diffusion_loss_matches_hand_values(weight: str, norm: str, expected: float) -> None:
    logits, targets, masked = _tiny_batch()
    out = masked_diffusion_loss(
        logits, targets, masked, P, loss_weight=weight, loss_norm=norm, answer_lengths=LENGTHS
    )
    assert out.value.item() == pytest.approx(expected, rel=1e-6)
    assert int(out.stats["masked_tokens"]) == 3
    assert int(out.stats["zero_masked_samples"]) == 0
    assert float(out.stats["supervised_fraction"]) == 1.0
    assert float(out.stats["mask_ratio"]) == pytest.approx(3 / 5)
    assert float(out.stats["ce_mean"]) == pytest.approx((CE00 + CE01 + CE10) / 3, rel=1e-6)


@pytest.mark.parametrize(
    ("norm", "lengths", "expected"),
    [
        # token (0,1) at weight 0.25: S_0 = 2 (CE00 + CE01 / 4), S_1 = 4 CE10
        ("token", None, (2 * (CE00 + CE01 / 4) + 4 * CE10) / 2.25),
        ("sequence", torch.tensor([2.25, 2.0]), (2 * (CE00 + CE01 / 4) / 2.25 + 4 * CE10 / 2) / 2),
    ],
)
def test_token_weight_scales_a_tokens_loss_and_its_share_of_the_normaliser(norm, lengths, expected) -> None:
    logits, targets, masked = _tiny_batch()
    weight = torch.ones(2, 3)
    weight[0, 1] = 0.25
    out = masked_diffusion_loss(
        logits, targets, masked, P, loss_norm=norm, answer_lengths=lengths, token_weight=weight
    )
    assert out.value.item() == pytest.approx(expected, rel=1e-6)
    assert "mask_ratio" not in out.stats  # weighted lengths are not token counts


def test_masked_diffusion_loss_gradient_only_at_masked_positions() -> None:
    logits, targets, masked = _tiny_batch()
    masked_diffusion_loss(logits, targets, masked, P).value.backward()
    grad_norm = logits.grad.abs().sum(dim=-1)
    assert bool((grad_norm[masked] > 0).all())
    assert bool((grad_norm[~masked] == 0).all())


def test_masked_diffusion_loss_counts_unsupervised_rows_and_handles_no_masks() -> None:
    logits, targets, masked = _tiny_batch()
    masked[1] = False
    out = masked_diffusion_loss(logits, targets, masked, P, answer_lengths=LENGTHS)
    assert int(out.stats["zero_masked_samples"]) == 1
    assert float(out.stats["supervised_fraction"]) == 0.5
    nothing = masked_diffusion_loss(logits, targets, torch.zeros_like(masked), P)
    assert nothing.value.item() == 0.0
    nothing.value.backward()  # still on the graph, so DDP sees every parameter used
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_masked_diffusion_loss_works_in_float32_for_bf16_logits() -> None:
    logits, targets, masked = _tiny_batch()
    out = masked_diffusion_loss(logits.detach().bfloat16(), targets, masked, P)
    assert out.value.dtype == torch.float32
    assert out.value.item() == pytest.approx((2 * (CE00 + CE01) + 4 * CE10) / 3, rel=1e-2)


def test_masked_diffusion_loss_rejects_bad_config() -> None:
    logits, targets, masked = _tiny_batch()
    with pytest.raises(ValueError, match="answer_lengths"):
        masked_diffusion_loss(logits, targets, masked, P, loss_norm="sequence")
    with pytest.raises(ValueError, match="loss_weight"):
        masked_diffusion_loss(logits, targets, masked, P, loss_weight="sqrt")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- stratified balance


def _routing(probs_rows: list[list[float]], top1: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample per row with a single token: probs Float[B, 1, E], top-1 indices Long[B, 1, 1]."""
    probs = torch.tensor(probs_rows).unsqueeze(1).requires_grad_()
    return probs, torch.tensor(top1).reshape(-1, 1, 1)


def test_balance_is_one_when_perfectly_balanced() -> None:
    probs = torch.full((8, 1, 4), 0.25)
    topk = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]).reshape(8, 1, 1)
    bucket = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    out = stratified_balance_loss([probs], [topk], torch.ones(8, 1, dtype=torch.bool), bucket, 2)
    assert out.value.item() == pytest.approx(1.0)
    assert torch.allclose(out.stats["router_entropy"], torch.tensor([math.log(4)]))
    assert torch.allclose(out.stats["expert_load"], torch.full((1, 2, 4), 0.25))


def test_balance_hand_value_for_a_skewed_router() -> None:
    # f = (1, 0), P = (0.8, 0.2): E * sum f P = 2 * 0.8.
    probs, topk = _routing([[0.8, 0.2], [0.8, 0.2]], [0, 0])
    out = stratified_balance_loss(
        [probs], [topk], torch.ones(2, 1, dtype=torch.bool), torch.zeros(2).long(), 1
    )
    assert out.value.item() == pytest.approx(1.6)
    out.value.backward()
    assert probs.grad is not None and bool((probs.grad[:, :, 0] != 0).all())


def test_stratified_balance_sees_per_bucket_imbalance_the_global_loss_misses() -> None:
    # Bucket 0 sends everything to expert 0, bucket 1 to expert 1: globally balanced, never per bucket.
    probs, topk = _routing([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], [0, 0, 1, 1])
    bucket = torch.tensor([0, 0, 1, 1])
    tokens = torch.ones(4, 1, dtype=torch.bool)
    global_loss = stratified_balance_loss([probs], [topk], tokens, torch.zeros(4).long(), 1)
    assert global_loss.value.item() == pytest.approx(1.0)
    stratified = stratified_balance_loss([probs], [topk], tokens, bucket, 2)
    assert stratified.value.item() == pytest.approx(2.0)
    assert torch.allclose(stratified.stats["expert_load"], torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    # Empty buckets are skipped rather than counted as zero.
    with_empty = stratified_balance_loss([probs], [topk], tokens, bucket, 4)
    assert with_empty.value.item() == pytest.approx(2.0)
    assert with_empty.stats["bucket_tokens"].tolist() == [2.0, 2.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="bucket ids"):
        stratified_balance_loss([probs], [topk], tokens, bucket, 1)


def test_balance_ignores_unselected_tokens_and_averages_layers() -> None:
    balanced, balanced_topk = _routing([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]], [0, 1, 0])
    skewed, skewed_topk = _routing([[0.8, 0.2], [0.8, 0.2], [0.0, 1.0]], [0, 0, 1])
    tokens = torch.tensor([[True], [True], [False]])
    out = stratified_balance_loss(
        [balanced, skewed], [balanced_topk, skewed_topk], tokens, torch.zeros(3).long(), 1
    )
    assert out.stats["balance_per_layer"].tolist() == pytest.approx([1.0, 1.6])
    assert out.value.item() == pytest.approx(1.3)
    assert out.stats["expert_load"].shape == (2, 1, 2)


def test_balance_top2_assignment_fractions() -> None:
    probs = torch.tensor([[[0.5, 0.3, 0.2]], [[0.4, 0.4, 0.2]]])
    topk = torch.tensor([[[0, 1]], [[0, 1]]])
    out = stratified_balance_loss(
        [probs], [topk], torch.ones(2, 1, dtype=torch.bool), torch.zeros(2).long(), 1
    )
    # f = (0.5, 0.5, 0), P = (0.45, 0.35, 0.2): 3 * (0.5 * 0.45 + 0.5 * 0.35).
    assert out.value.item() == pytest.approx(3 * (0.5 * 0.45 + 0.5 * 0.35))


# --------------------------------------------------------------------------- z-loss


def test_router_z_loss_hand_value_and_gradient() -> None:
    logits = torch.tensor([[[0.0, math.log(3)], [1.0, 1.0], [50.0, 50.0]]], requires_grad=True)
    tokens = torch.tensor([[True, True, False]])
    out = router_z_loss([logits], tokens)
    expected = (math.log(4) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert out.value.item() == pytest.approx(expected, rel=1e-6)
    out.value.backward()
    assert bool((logits.grad[0, :2] > 0).all()) and bool((logits.grad[0, 2] == 0).all())


# --------------------------------------------------------------------------- routing prior


def test_router_prior_ema_updates() -> None:
    ema = RouterPriorEMA(num_layers=2, num_experts=2, momentum=0.9)
    assert torch.equal(ema.prior, torch.full((2, 2), 0.5))
    ema.update(torch.tensor([[1.0, 0.0], [0.2, 0.8]]))  # first update copies
    assert torch.allclose(ema.prior, torch.tensor([[1.0, 0.0], [0.2, 0.8]]))
    ema.update(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))  # layer 1 saw no tokens and keeps its prior
    assert torch.allclose(ema.prior, torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    assert int(ema.num_updates) == 2 and set(ema.state_dict()) == {"prior", "num_updates"}
    with pytest.raises(ValueError, match="shape"):
        ema.update(torch.ones(3, 2))


def test_mean_router_distribution_over_visible_tokens() -> None:
    probs = torch.tensor([[[0.6, 0.4], [0.2, 0.8], [0.0, 1.0]]])
    visible = torch.tensor([[True, True, False]])
    assert torch.allclose(mean_router_distribution([probs], visible), torch.tensor([[0.4, 0.6]]))


def test_routing_prior_is_zero_without_drift_and_hand_checked_with_drift() -> None:
    same = torch.tensor([[[0.7, 0.3]], [[0.7, 0.3]]], requires_grad=True)
    bucket = torch.tensor([0, 1])
    visible = torch.ones(2, 1, dtype=torch.bool)
    prior = torch.tensor([[0.7, 0.3]])
    assert routing_prior_loss([same], visible, bucket, 2, prior).value.item() == pytest.approx(0.0, abs=1e-7)

    drift = torch.tensor([[[0.75, 0.25]], [[0.25, 0.75]], [[0.0, 1.0]]], requires_grad=True)
    visible = torch.tensor([[True], [True], [False]])
    prior = torch.tensor([[0.5, 0.5]], requires_grad=True)
    out = routing_prior_loss([drift], visible, torch.tensor([0, 1, 1]), 4, prior)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert out.value.item() == pytest.approx(kl, rel=1e-6)
    assert torch.allclose(out.stats["bucket_mean_prob"][0, :2], torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    out.value.backward()
    assert bool((drift.grad[:2] != 0).any()) and bool((drift.grad[2] == 0).all())
    assert prior.grad is None  # the prior is stop-gradient


# --------------------------------------------------------------------------- view consistency


def test_consistency_is_zero_for_identical_views() -> None:
    probs = torch.softmax(torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    topk = probs.topk(2, dim=-1).indices
    out = view_consistency_loss([probs], [probs.clone()], torch.ones(2, 5, dtype=torch.bool), [topk], [topk])
    assert out.value.item() == pytest.approx(0.0, abs=1e-7)
    assert out.stats["topk_jaccard"].tolist() == [1.0]


def test_consistency_hand_value_jaccard_and_gradients() -> None:
    view_a = torch.tensor([[[0.5, 0.5, 0.0], [0.1, 0.1, 0.8]]], requires_grad=True)
    view_b = torch.tensor([[[0.75, 0.25, 0.0], [0.8, 0.1, 0.1]]], requires_grad=True)
    both = torch.tensor([[True, False]])  # the second token is masked in one view
    top_a, top_b = torch.tensor([[[0, 1], [2, 0]]]), torch.tensor([[[0, 2], [0, 1]]])
    out = view_consistency_loss([view_a], [view_b], both, [top_a], [top_b])
    kl_ab = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl_ba = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert out.value.item() == pytest.approx(0.5 * (kl_ab + kl_ba), rel=1e-6)
    assert out.stats["topk_jaccard"].tolist() == pytest.approx([1 / 3])  # {0,1} vs {0,2}
    assert int(out.stats["tokens"]) == 1
    out.value.backward()
    assert bool((view_a.grad[0, 0, :2] != 0).all()) and bool((view_b.grad[0, 0, :2] != 0).all())
    assert bool((view_a.grad[0, 1] == 0).all())


# --------------------------------------------------------------------------- CAP


def test_cap_is_entropy_of_correct_masked_predictions() -> None:
    logits = torch.tensor(
        [[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [3.0, float("-inf"), 0.0]]], requires_grad=True
    )
    targets = torch.tensor([[0, 0, 0, 0]])
    masked = torch.tensor([[True, True, False, True]])  # pos 1 is wrong, pos 2 is not masked
    out = cap_confidence_loss(logits, targets, masked)
    z0, z3 = math.exp(2) + 2, math.exp(3) + 1
    expected = (_entropy([math.exp(2) / z0, 1 / z0, 1 / z0]) + _entropy([math.exp(3) / z3, 1 / z3])) / 2
    assert out.value.item() == pytest.approx(expected, rel=1e-6)
    assert int(out.stats["correct_masked"]) == 2
    assert float(out.stats["masked_accuracy"]) == pytest.approx(2 / 3)
    out.value.backward()
    assert bool((logits.grad[0, 0] != 0).any())
    assert bool((logits.grad[0, 1:3] == 0).all())
    assert bool(torch.isfinite(logits.grad).all())


def test_cap_is_zero_when_nothing_masked_is_correct() -> None:
    logits = torch.tensor([[[0.0, 2.0], [2.0, 0.0]]], requires_grad=True)
    out = cap_confidence_loss(logits, torch.tensor([[0, 1]]), torch.tensor([[True, True]]))
    assert out.value.item() == 0.0
    out.value.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
