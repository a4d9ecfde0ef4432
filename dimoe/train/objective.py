"""The training objective of one step: noise the batch into views, run the model once on all
views, and combine the diffusion loss with the DMAR / EBCMC / CAP terms (docs/design.md §4).

Pure torch and model-agnostic beyond `model(...)` returning logits and router outputs, so it is
unit-tested without Ray or DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dimoe.config.train import TrainConfig
from dimoe.diffusion import (
    NoisedBatch,
    RouterPriorEMA,
    cap_confidence_loss,
    complementary_views,
    eligible_positions,
    independent_views,
    masked_diffusion_loss,
    mean_router_distribution,
    router_z_loss,
    routing_prior_loss,
    sample_timesteps,
    single_view,
    stratified_balance_loss,
    view_consistency_loss,
)
from dimoe.train.batch import MODALITIES, TrainBatch


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, float]  # scalars for train_metrics.jsonl
    routing: dict[str, Any] = field(default_factory=dict)  # per-layer tensors for routing_stats.jsonl


def make_views(
    cfg: TrainConfig, batch: TrainBatch, mask_token_id: int, generator: torch.Generator
) -> NoisedBatch:
    d = cfg.diffusion
    ts = d.timesteps
    t = sample_timesteps(
        ts.kind, batch.input_ids.shape[0], generator,
        num_buckets=d.num_t_buckets, t_min=ts.t_min, t_max=ts.t_max, mean=ts.mean, std=ts.std,
    )  # fmt: skip
    eligible = eligible_positions(
        batch.response_mask, batch.prompt_text_mask, d.include_prompt_ratio, generator
    )
    common = {"num_buckets": d.num_t_buckets, "eps": d.mask_eps}
    if d.views == "complementary":
        return complementary_views(batch.input_ids, eligible, t, mask_token_id, generator, **common)
    if d.views == "independent":
        return independent_views(batch.input_ids, eligible, t, 1 - t, mask_token_id, generator, **common)
    return single_view(batch.input_ids, eligible, t, mask_token_id, generator, **common)


def training_step(
    model: torch.nn.Module,
    cfg: TrainConfig,
    batch: TrainBatch,
    generator: torch.Generator,
    prior: RouterPriorEMA | None,
    *,
    mask_token_id: int,
    encode_images: Any,
    collect_routing: bool = False,
    blank_image: torch.Tensor | None = None,
) -> StepOutput:
    """Forward all views in one call and return the weighted loss with its parts.

    `encode_images` runs the vision tower; it is called once per batch and its features are shared
    by both views of every sample (EBCMC: the tower runs once per complementary pair).
    `blank_image` ([1, 3, S, S]), when given, goes through the tower with weight 0 in a batch
    without images: data-parallel ranks reduce gradients bucket by bucket in lockstep, so every
    rank's backward must reach the vision parameters even when its batch is text only."""
    noised = make_views(cfg, batch, mask_token_id, generator)
    views = noised.num_views
    real = batch.attention_mask
    features = encode_images(batch.pixel_values) if batch.pixel_values.numel() else None
    out = model(
        noised.noisy_ids,
        real.repeat(views, 1).long(),
        prefix_mask=batch.prefix_mask.repeat(views, 1),
        image_features=torch.cat([features] * views) if features is not None else None,
    )
    targets = batch.input_ids.repeat(views, 1)
    losses = cfg.losses
    token_weight, answer_lengths = _eos_padding_weights(cfg, batch, noised)
    diff = masked_diffusion_loss(
        out.logits, targets, noised.masked, noised.p,
        loss_weight=cfg.diffusion.loss_weight, loss_norm=cfg.diffusion.loss_norm,
        answer_lengths=answer_lengths, token_weight=token_weight,
    )  # fmt: skip
    visible = noised.visible(real)
    k = cfg.diffusion.num_t_buckets
    if losses.stratified_balance:
        balance = stratified_balance_loss(out.router_probs, out.router_topk, visible, noised.bucket, k)
    else:  # one global bucket: the ordinary Switch loss of the naive baseline
        balance = stratified_balance_loss(
            out.router_probs, out.router_topk, visible, torch.zeros_like(noised.bucket), 1
        )
    z = router_z_loss(out.router_logits, real.repeat(views, 1))
    total = diff.value + losses.lambda_bal * balance.value + losses.lambda_z * z.value
    if features is None and blank_image is not None:
        total = total + 0.0 * encode_images(blank_image).sum()
    metrics = {
        "loss_diffusion": diff.value.item(),
        "loss_bal": balance.value.item(),
        "loss_z": z.value.item(),
        "masked_tokens": float(diff.stats["masked_tokens"]),
        "eligible_tokens": float(noised.eligible.sum()),
        "zero_supervision_samples": float(_zero_supervision_samples(noised)),
        "samples": float(batch.input_ids.shape[0]),
        "tokens": float(real.sum() * views),
        "t_mean": noised.t.mean().item(),
    }
    if losses.lambda_prior > 0 and prior is not None:
        with torch.no_grad():
            prior.update(mean_router_distribution(out.router_probs, visible))
        prior_loss = routing_prior_loss(out.router_probs, visible, noised.bucket, k, prior.prior)
        total = total + losses.lambda_prior * prior_loss.value
        metrics["loss_prior"] = prior_loss.value.item()
    consistency = None
    if views == 2:
        b = batch.input_ids.shape[0]
        consistency = view_consistency_loss(
            [p[:b] for p in out.router_probs],
            [p[b:] for p in out.router_probs],
            noised.visible_in_both(real),
            [t[:b] for t in out.router_topk],
            [t[b:] for t in out.router_topk],
        )
        metrics["loss_cons"] = consistency.value.item()
        if losses.lambda_cons > 0:
            total = total + losses.lambda_cons * consistency.value
    if losses.lambda_cap > 0:
        cap = cap_confidence_loss(out.logits, targets, noised.masked)
        total = total + losses.lambda_cap * cap.value
        metrics["loss_cap"] = cap.value.item()
    metrics["loss"] = total.item()
    routing = _routing_stats(out, noised, batch, visible, k, consistency) if collect_routing else {}
    return StepOutput(total, metrics, routing)


def _eos_padding_weights(
    cfg: TrainConfig, batch: TrainBatch, noised: NoisedBatch
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-token loss weights that scale the EOS padding by `eos_padding_weight`, and the matching
    weighted eligible count per row (the `sequence` normaliser); (None, plain counts) at weight 1."""
    w = cfg.diffusion.eos_padding_weight
    if w == 1.0:
        return None, noised.answer_lengths
    padding = batch.eos_padding_mask.repeat(noised.num_views, 1)
    weight = torch.where(padding, w, 1.0)
    return weight, (weight * noised.eligible).sum(dim=1)


def _zero_supervision_samples(noised: NoisedBatch) -> int:
    """Samples whose views together supervise no token (problem D): complementary views make it 0."""
    b = noised.masked.shape[0] // noised.num_views
    per_sample = noised.masked.view(noised.num_views, b, -1).any(dim=2).any(dim=0)
    return int((~per_sample).sum())


@torch.no_grad()
def _routing_stats(out, noised, batch, visible, num_buckets, consistency) -> dict[str, Any]:
    """Per layer: expert load per t-bucket over visible tokens, router entropy, top-k overlap
    between views, and expert usage per modality (image / prompt / response)."""
    stats = stratified_balance_loss(
        out.router_probs, out.router_topk, visible, noised.bucket, num_buckets
    ).stats
    modality = batch.modality.repeat(noised.num_views, 1)
    num_experts = out.router_probs[0].shape[-1]
    usage = []
    for topk in out.router_topk:
        per_modality = {}
        for index, name in enumerate(MODALITIES):
            chosen = topk[(modality == index) & visible].reshape(-1)
            per_modality[name] = torch.bincount(chosen, minlength=num_experts).tolist()
        usage.append(per_modality)
    jaccard = consistency.stats.get("topk_jaccard") if consistency is not None else None
    return {
        "expert_load": stats["expert_load"].tolist(),  # [layers][buckets][experts]
        "bucket_tokens": stats["bucket_tokens"].tolist(),
        "router_entropy": stats["router_entropy"].tolist(),
        "topk_overlap": jaccard.tolist() if jaccard is not None else None,
        "view_consistency_kl": consistency.stats["consistency_per_layer"].tolist() if consistency else None,
        "modality_usage": usage,
    }
