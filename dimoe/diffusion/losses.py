"""Training losses: the masked-diffusion ELBO, DMAR routing losses and the CAP confidence loss.

The functions see plain tensors (logits, router probabilities / logits, top-k indices, masks),
never the model. All arithmetic is done in float32 whatever the input dtype (bf16 logits are cast
after selecting the positions that matter, to keep the memory cost to the selected rows). Each
loss returns a `LossOutput`: a differentiable scalar ``value`` that stays attached to the graph even
when no position qualifies (so every parameter still gets a gradient, as DDP/DeepSpeed expect),
and detached ``stats`` tensors for telemetry.

Router inputs are per-layer lists: ``router_probs[l]`` is Float[B, L, E] (softmax over experts),
``router_topk[l]`` is Long[B, L, k] (chosen experts), ``router_logits[l]`` is Float[B, L, E]
(pre-softmax, needed only by the z-loss because logsumexp cannot be recovered from probabilities).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LossWeight = Literal["elbo", "uniform"]
LossNorm = Literal["token", "sequence", "batch"]

# Floor for probabilities before taking logs: far below any float32 softmax output we care about,
# far above the underflow that would give log(0) = -inf.
_PROB_FLOOR = 1e-12


@dataclass
class LossOutput:
    """A differentiable scalar loss plus detached statistics for telemetry."""

    value: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def _safe_log(probs: torch.Tensor) -> torch.Tensor:
    return probs.clamp_min(_PROB_FLOOR).log()


def _per_position_rows(mask: torch.Tensor) -> torch.Tensor:
    """Row index of every True position of a [B, L] mask, in ``tensor[mask]`` order."""
    rows = torch.arange(mask.shape[0], device=mask.device)
    return rows[:, None].expand_as(mask)[mask]


def _nonempty_mean(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over entries with a positive count; 0 (still on the graph) if there are none."""
    nonempty = (counts > 0).to(values.dtype)
    return (values * nonempty).sum() / nonempty.sum().clamp(min=1)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def masked_diffusion_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    p: torch.Tensor,
    *,
    loss_weight: LossWeight = "elbo",
    loss_norm: LossNorm = "token",
    answer_lengths: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
) -> LossOutput:
    """Cross-entropy on masked tokens, weighted and normalised as configured.

    With S_i = w_i * sum_{j masked in row i} -log p_theta(x0_ij | x_t), where w_i = 1 / p_i for
    ``elbo`` (the 1/t weight of the LLaDA objective, Nie et al. 2025, arXiv:2502.09992, Eq. 3;
    here 1/p(t) with the eps-floored mask probability) and w_i = 1 for ``uniform``:

    - ``token``:    sum_i S_i / M, M = number of masked tokens in the batch;
    - ``sequence``: mean_i S_i / n_i, n_i = ``answer_lengths[i]`` = eligible tokens of row i
      (the per-answer-length normalisation of LLaDA SFT, Eq. 5), averaged over all B rows;
    - ``batch``:    sum_i S_i / sum_i n_i, i.e. normalised by the total eligible tokens in the batch.

    ``token_weight`` (Float[B, L], optional) scales each token's cross-entropy inside S_i, and M
    becomes the summed weight of the masked tokens; give ``answer_lengths`` as the matching
    weighted eligible counts. ``row_weight`` (Float[B], optional) multiplies S_i and nothing else:
    the importance weight of a row whose t was drawn from a proposal (dimoe.diffusion.ppots).
    Denominators are clamped to >= 1, so a batch without masked tokens gives 0.

    Stats: ``masked_tokens`` (M), ``zero_masked_samples`` (rows with no masked token, problem D),
    ``supervised_fraction`` (rows with >= 1 masked token / B), ``ce_mean`` (unweighted CE per masked
    token) and, when ``answer_lengths`` is given, ``mask_ratio`` (M / eligible tokens).
    """
    _check_choice("loss_weight", loss_weight, ("elbo", "uniform"))
    _check_choice("loss_norm", loss_norm, ("token", "sequence", "batch"))
    if loss_norm != "token" and answer_lengths is None:
        raise ValueError(f"loss_norm={loss_norm!r} needs answer_lengths (eligible tokens per sample)")
    masked = masked.bool()
    ce, weights, weighted = _row_sums(logits, targets, masked, p, loss_weight, token_weight)
    if row_weight is not None:
        weighted = weighted * row_weight.float()
    batch = masked.shape[0]
    num_masked = masked.sum()
    if loss_norm == "token":
        value = weighted.sum() / weights.sum().clamp(min=1)
    elif loss_norm == "sequence":
        value = (weighted / answer_lengths.clamp(min=1)).mean()
    else:
        value = weighted.sum() / answer_lengths.sum().clamp(min=1)
    zero_rows = (masked.sum(dim=1) == 0).sum()
    stats = {
        "masked_tokens": num_masked,
        "zero_masked_samples": zero_rows,
        "supervised_fraction": 1.0 - zero_rows.float() / batch,
        "ce_mean": ce.detach().sum() / num_masked.clamp(min=1),
    }
    if answer_lengths is not None and token_weight is None:  # weighted lengths are not token counts
        stats["mask_ratio"] = num_masked.float() / answer_lengths.sum().clamp(min=1)
    return LossOutput(value, stats)


def _row_sums(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    p: torch.Tensor,
    loss_weight: LossWeight,
    token_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE of each masked token, its token weight, S_i of each row) for `masked_diffusion_loss`."""
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    weights = token_weight[masked].float() if token_weight is not None else torch.ones_like(ce)
    ce_per_row = ce.new_zeros(masked.shape[0]).index_add(0, _per_position_rows(masked), ce * weights)
    weight = 1.0 / p.float() if loss_weight == "elbo" else torch.ones_like(ce_per_row)
    return ce, weights, weight * ce_per_row


def per_row_diffusion_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    p: torch.Tensor,
    answer_lengths: torch.Tensor,
    *,
    loss_weight: LossWeight = "elbo",
    token_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """S_i / n_i of every row (Float[B]): the row's term of the ``sequence``-normalised loss, whose
    mean and variance over rows and masks at a t are P-POTS's m(t) and v(t)."""
    _, _, weighted = _row_sums(logits, targets, masked.bool(), p, loss_weight, token_weight)
    return weighted / answer_lengths.clamp(min=1)


def _check_layers(*per_layer: Sequence[torch.Tensor]) -> None:
    lengths = {len(tensors) for tensors in per_layer}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"router inputs must be non-empty per-layer lists of equal length, got {lengths}")


def _bucket_sums(values: torch.Tensor, token_bucket: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Per-bucket sums Float[K, E] of token rows Float[N, E]."""
    return values.new_zeros(num_buckets, values.shape[-1]).index_add(0, token_bucket, values)


def _bucket_counts(token_bucket: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Number of selected tokens per bucket, Float[K]."""
    return torch.bincount(token_bucket, minlength=num_buckets).float()


def _token_buckets(bucket: torch.Tensor, token_mask: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket of every selected token, Long[N], in ``tensor[token_mask]`` order."""
    # Checked here because an out-of-range index would otherwise be a device-side assert on GPU.
    if bucket.numel() and not 0 <= int(bucket.min()) <= int(bucket.max()) < num_buckets:
        raise ValueError(f"bucket ids must lie in [0, {num_buckets - 1}], got {bucket.tolist()}")
    return bucket[:, None].expand_as(token_mask)[token_mask]


def _topk_multihot(topk: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Float[N, E] with a 1 for each expert in a token's top-k set (multi-hot)."""
    multihot = torch.zeros(topk.shape[0], num_experts, device=topk.device)
    return multihot.scatter_add(1, topk, torch.ones_like(topk, dtype=multihot.dtype))


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * _safe_log(probs)).sum(dim=-1)


def stratified_balance_loss(
    router_probs: Sequence[torch.Tensor],
    router_topk: Sequence[torch.Tensor],
    token_mask: torch.Tensor,
    bucket: torch.Tensor,
    num_buckets: int,
) -> LossOutput:
    """Switch load-balance loss computed inside each t-bucket (DMAR ``lambda_bal``).

    For layer l and bucket b over the tokens T_b selected by ``token_mask`` in rows of bucket b:
    L_{l,b} = E * sum_e f_e P_e (Fedus et al. 2021, Switch Transformer Eq. 4), where
    f_e = (assignments of tokens of T_b to expert e among their top-k) / (k |T_b|) and
    P_e = mean router probability of e over T_b. The loss is the mean over layers of the mean over
    non-empty buckets. It equals 1 under perfect balance (f = P = 1/E) and E when every token goes
    to one expert with probability 1. With ``num_buckets=1`` it is the ordinary global loss.
    f is piecewise constant in the router parameters, so gradients flow through P only.

    Which tokens to pass is the caller's choice: typically real (non-pad) tokens, or only visible
    ones, since at layer 0 every mask token has the same router input and cannot be balanced.

    Stats: ``expert_load`` Float[layers, K, E] (f per bucket; zero rows for empty buckets),
    ``bucket_tokens`` Float[K], ``router_entropy`` Float[layers] (mean entropy of the router
    distribution over the selected tokens) and ``balance_per_layer`` Float[layers].
    """
    _check_layers(router_probs, router_topk)
    token_mask = token_mask.bool()
    token_bucket = _token_buckets(bucket, token_mask, num_buckets)
    counts = _bucket_counts(token_bucket, num_buckets)
    layer_losses, loads, entropies = [], [], []
    for probs_l, topk_l in zip(router_probs, router_topk, strict=True):
        probs = probs_l[token_mask].float()
        topk = topk_l[token_mask]
        num_experts, k = probs.shape[-1], topk.shape[-1]
        load = _bucket_sums(_topk_multihot(topk, num_experts), token_bucket, num_buckets)
        load = load / (k * counts).clamp(min=1)[:, None]
        mean_prob = _bucket_sums(probs, token_bucket, num_buckets) / counts.clamp(min=1)[:, None]
        layer_losses.append(_nonempty_mean(num_experts * (load * mean_prob).sum(dim=-1), counts))
        loads.append(load)
        entropies.append(_entropy(probs.detach()).sum() / max(probs.shape[0], 1))
    per_layer = torch.stack(layer_losses)
    stats = {
        "expert_load": torch.stack(loads).detach(),
        "bucket_tokens": counts,
        "router_entropy": torch.stack(entropies),
        "balance_per_layer": per_layer.detach(),
    }
    return LossOutput(per_layer.mean(), stats)


def router_z_loss(router_logits: Sequence[torch.Tensor], token_mask: torch.Tensor) -> LossOutput:
    """Router z-loss: mean over selected tokens and layers of logsumexp(router logits)^2.

    (Zoph et al. 2022, ST-MoE Eq. 5.) It keeps router logits small so the softmax stays in a
    numerically benign range. Stats: ``z_per_layer`` Float[layers].
    """
    _check_layers(router_logits)
    token_mask = token_mask.bool()
    count = token_mask.sum().clamp(min=1)
    per_layer = torch.stack(
        [
            torch.logsumexp(logits[token_mask].float(), dim=-1).square().sum() / count
            for logits in router_logits
        ]
    )
    return LossOutput(per_layer.mean(), {"z_per_layer": per_layer.detach()})


def mean_router_distribution(router_probs: Sequence[torch.Tensor], visible: torch.Tensor) -> torch.Tensor:
    """Mean router distribution over the visible tokens of the batch, Float[layers, E] (all buckets).

    Rows are zero when there are no visible tokens. Under data parallelism, average this across
    ranks before `RouterPriorEMA.update` so every rank keeps the same prior.
    """
    _check_layers(router_probs)
    visible = visible.bool()
    count = visible.sum().clamp(min=1)
    return torch.stack([probs[visible].float().sum(dim=0) / count for probs in router_probs])


class RouterPriorEMA(nn.Module):
    """Running (EMA) mean router distribution per layer: the stop-gradient prior of DMAR ``lambda_prior``.

    ``prior`` is a buffer Float[layers, E] (saved in ``state_dict``), initialised uniform; the first
    update copies the batch mean so the prior carries no bias from that initial value. Call
    `update` with the current batch's `mean_router_distribution`, then pass ``prior`` to
    `routing_prior_loss`.
    """

    def __init__(self, num_layers: int, num_experts: int, momentum: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("prior", torch.full((num_layers, num_experts), 1.0 / num_experts))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, batch_mean: torch.Tensor) -> None:
        """EMA step towards ``batch_mean`` Float[layers, E]; layers whose batch mean is all zero
        (no visible tokens) keep their previous prior."""
        if batch_mean.shape != self.prior.shape:
            raise ValueError(f"batch_mean shape {tuple(batch_mean.shape)} != prior {tuple(self.prior.shape)}")
        batch_mean = batch_mean.detach().to(self.prior)
        momentum = self.momentum if int(self.num_updates) > 0 else 0.0
        blended = momentum * self.prior + (1.0 - momentum) * batch_mean
        has_tokens = batch_mean.sum(dim=-1, keepdim=True) > 0
        self.prior.copy_(torch.where(has_tokens, blended, self.prior))
        self.num_updates += 1


def routing_prior_loss(
    router_probs: Sequence[torch.Tensor],
    visible: torch.Tensor,
    bucket: torch.Tensor,
    num_buckets: int,
    prior: torch.Tensor,
) -> LossOutput:
    """Routing-prior loss (DMAR ``lambda_prior``): mean over layers and non-empty buckets of
    KL(P̄_{l,b} || P̄_l), where P̄_{l,b} is the mean router distribution over the visible tokens of
    bucket b at layer l and ``prior`` = P̄ Float[layers, E] is the stop-gradient running mean over all
    buckets (`RouterPriorEMA.prior`). It is zero exactly when every bucket routes like the prior,
    i.e. routing does not drift with t (problem A).

    Stats: ``bucket_mean_prob`` Float[layers, K, E] (P̄_{l,b}; zero rows for empty buckets) and
    ``prior_kl_per_layer`` Float[layers].
    """
    _check_layers(router_probs)
    if prior.shape[0] != len(router_probs):
        raise ValueError(
            f"prior has {prior.shape[0]} layers but {len(router_probs)} router outputs were given"
        )
    visible = visible.bool()
    token_bucket = _token_buckets(bucket, visible, num_buckets)
    counts = _bucket_counts(token_bucket, num_buckets)
    log_prior = _safe_log(prior.detach().float())
    layer_losses, bucket_means = [], []
    for layer, probs_l in enumerate(router_probs):
        prob_sums = _bucket_sums(probs_l[visible].float(), token_bucket, num_buckets)
        mean_prob = prob_sums / counts.clamp(min=1)[:, None]
        kl = (mean_prob * (_safe_log(mean_prob) - log_prior[layer])).sum(dim=-1)
        layer_losses.append(_nonempty_mean(kl, counts))
        bucket_means.append(mean_prob)
    per_layer = torch.stack(layer_losses)
    stats = {"bucket_mean_prob": torch.stack(bucket_means).detach(), "prior_kl_per_layer": per_layer.detach()}
    return LossOutput(per_layer.mean(), stats)


def _topk_jaccard(topk_a: torch.Tensor, topk_b: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Mean Jaccard overlap |A ∩ B| / |A ∪ B| of per-token top-k expert sets, Long[N, k] each."""
    in_a = _topk_multihot(topk_a, num_experts) > 0
    in_b = _topk_multihot(topk_b, num_experts) > 0
    jaccard = (in_a & in_b).sum(dim=-1) / (in_a | in_b).sum(dim=-1).clamp(min=1)
    return jaccard.sum() / max(jaccard.shape[0], 1)


def view_consistency_loss(
    probs_view_a: Sequence[torch.Tensor],
    probs_view_b: Sequence[torch.Tensor],
    visible_in_both: torch.Tensor,
    topk_view_a: Sequence[torch.Tensor] | None = None,
    topk_view_b: Sequence[torch.Tensor] | None = None,
) -> LossOutput:
    """Routing consistency across the two views (DMAR ``lambda_cons``).

    For every token visible in both views: 0.5 * [KL(r_a || r_b) + KL(r_b || r_a)]
    = 0.5 * sum_e (r_a,e - r_b,e)(log r_a,e - log r_b,e), the symmetrised KL between its router
    distributions r_a, r_b in the two views; averaged over those tokens, then over layers. Both
    views receive gradient. Zero iff the router distributions agree on every such token.

    Stats: ``consistency_per_layer`` Float[layers], ``tokens`` (count of tokens visible in both)
    and, when the top-k indices of both views are given, ``topk_jaccard`` Float[layers]: mean
    Jaccard overlap of the two views' top-k expert sets (problem B; 0 when there are no tokens).
    """
    _check_layers(probs_view_a, probs_view_b)
    visible_in_both = visible_in_both.bool()
    count = visible_in_both.sum()
    per_layer = []
    for probs_a, probs_b in zip(probs_view_a, probs_view_b, strict=True):
        a, b = probs_a[visible_in_both].float(), probs_b[visible_in_both].float()
        sym_kl = 0.5 * ((a - b) * (_safe_log(a) - _safe_log(b))).sum(dim=-1)
        per_layer.append(sym_kl.sum() / count.clamp(min=1))
    per_layer_t = torch.stack(per_layer)
    stats = {"consistency_per_layer": per_layer_t.detach(), "tokens": count}
    if topk_view_a is not None and topk_view_b is not None:
        _check_layers(probs_view_a, topk_view_a, topk_view_b)
        num_experts = probs_view_a[0].shape[-1]
        stats["topk_jaccard"] = torch.stack(
            [
                _topk_jaccard(ta[visible_in_both], tb[visible_in_both], num_experts)
                for ta, tb in zip(topk_view_a, topk_view_b, strict=True)
            ]
        )
    return LossOutput(per_layer_t.mean(), stats)


def cap_confidence_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> LossOutput:
    """CAP confidence loss (``lambda_cap``, stage3_lownfe): mean entropy of the predictive
    distribution over masked positions whose argmax already equals the target.

    H_j = -sum_v q_jv log q_jv with q_j = softmax(logits_j). Sharpening already-correct predictions
    lets few-step decoding commit them early. 0 (on the graph) when no masked position is correct.
    Stats: ``correct_masked`` (count) and ``masked_accuracy`` (correct / masked).
    """
    masked = masked.bool()
    selected = logits[masked].float()
    correct = selected.argmax(dim=-1) == targets[masked]
    log_q = F.log_softmax(selected[correct], dim=-1)
    # Logits of -inf (banned tokens) give log q = -inf and 0 * -inf = nan; the clamp makes them 0.
    entropy = -(log_q.exp() * log_q.clamp_min(torch.finfo(log_q.dtype).min)).sum(dim=-1)
    num_correct = correct.sum()
    stats = {
        "correct_masked": num_correct,
        "masked_accuracy": num_correct.float() / masked.sum().clamp(min=1),
    }
    return LossOutput(entropy.sum() / num_correct.clamp(min=1), stats)
