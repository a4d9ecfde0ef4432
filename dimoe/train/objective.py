"""The training objective of one step: noise the batch into views, run the model once on all
views, and combine the diffusion loss with the DMAR / EBCMC / CAP terms (docs/design.md §4).

Pure torch and model-agnostic beyond `model(...)` returning logits and router outputs, so it is
unit-tested without Ray or DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dimoe.config.train import DiffusionSpec, TrainConfig
from dimoe.diffusion import (
    LossOutput,
    NoisedBatch,
    RouterPriorEMA,
    cap_confidence_loss,
    complementary_views,
    eligible_positions,
    independent_views,
    masked_diffusion_loss,
    mean_router_distribution,
    mirror_views,
    per_row_diffusion_loss,
    router_z_loss,
    routing_prior_loss,
    sample_timesteps,
    single_view,
    stratified_balance_loss,
    view_consistency_loss,
)
from dimoe.diffusion.ppots import Proposal, fit_proposal, loss_moments, optimal_shape
from dimoe.model.attention import build_attention_mask, token_positions, within_documents
from dimoe.train.batch import MODALITIES, TrainBatch

if TYPE_CHECKING:
    from dimoe.model.modeling import DiMoEOutput


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, float]  # scalars for train_metrics.jsonl
    routing: dict[str, Any] = field(default_factory=dict)  # per-layer tensors for routing_stats.jsonl


def sample_t(
    cfg: TrainConfig, batch_size: int, generator: torch.Generator, proposal: Proposal | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows' noise levels and, under P-POTS, their importance weights (None otherwise)."""
    d, ts = cfg.diffusion, cfg.diffusion.timesteps
    if ts.kind == "ppots":
        if proposal is None:
            raise ValueError("timesteps.kind ppots needs the fitted proposal (estimate_proposal)")
        t = proposal.sample(batch_size, generator)
        return t, proposal.weights(t)
    t = sample_timesteps(
        ts.kind, batch_size, generator,
        num_buckets=d.num_t_buckets, t_min=ts.t_min, t_max=ts.t_max, mean=ts.mean, std=ts.std,
    )  # fmt: skip
    return t, None


def make_views(
    cfg: TrainConfig,
    batch: TrainBatch,
    mask_token_id: int,
    generator: torch.Generator,
    t: torch.Tensor | None = None,
    views: str | None = None,
) -> NoisedBatch:
    """The noised views of `batch` (`views`, default the config's) at noise levels `t` (default:
    drawn by the config's sampler, which must then not be `ppots`)."""
    d = cfg.diffusion
    if t is None:
        t, _ = sample_t(cfg, batch.input_ids.shape[0], generator)
    eligible = eligible_positions(
        batch.response_mask, batch.prompt_text_mask, d.include_prompt_ratio, generator
    )
    common = {"num_buckets": d.num_t_buckets, "eps": d.mask_eps}
    views = views or d.views
    if views == "complementary":
        return complementary_views(batch.input_ids, eligible, t, mask_token_id, generator, **common)
    if views == "independent":
        return independent_views(batch.input_ids, eligible, t, 1 - t, mask_token_id, generator, **common)
    if views == "mirror":
        return mirror_views(batch.input_ids, eligible, t, mask_token_id, generator, **common)
    return single_view(batch.input_ids, eligible, t, mask_token_id, generator, **common)


def estimate_proposal(
    model: torch.nn.Module,
    cfg: TrainConfig,
    batch: TrainBatch,
    generator: torch.Generator,
    *,
    mask_token_id: int,
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    block_size: int | None = None,
) -> tuple[Proposal, dict[str, list[float]]]:
    """P-POTS: m(t) and v(t) of the per-row loss of the current model on a grid of t (the first
    `num_rows` rows of `batch` × `num_masks` single-view masks each), and the proposal fitted to
    w(t) = sqrt(v + m²). Returns it with the estimate, for the log."""
    ts, spec = cfg.diffusion.timesteps, cfg.diffusion.timesteps.ppots
    rows = batch.head(spec.num_rows).repeat(spec.num_masks)
    features = encode_images(rows.pixel_values) if rows.pixel_values.numel() else None

    @torch.no_grad()
    def row_losses(t: float) -> torch.Tensor:
        level = torch.full((rows.input_ids.shape[0],), t)
        noised = make_views(cfg, rows, mask_token_id, generator, t=level, views="single")
        out = _forward_views(model, rows, noised, features, block_size)
        token_weight, answer_lengths = _eos_padding_weights(cfg, rows, noised)
        return per_row_diffusion_loss(
            out.logits, rows.input_ids, noised.masked, noised.p, answer_lengths,
            loss_weight=cfg.diffusion.loss_weight, token_weight=token_weight,
        )  # fmt: skip

    width = (ts.t_max - ts.t_min) / spec.grid_size
    grid = torch.linspace(ts.t_min + width / 2, ts.t_max - width / 2, spec.grid_size, dtype=torch.float64)
    was_training = model.training
    model.eval()
    means, variances = loss_moments(row_losses, grid)
    model.train(was_training)
    shape = optimal_shape(means, variances)
    proposal = fit_proposal(
        grid, shape, p_model=spec.p_model, t_min=ts.t_min, t_max=ts.t_max,
        uniform_mix=spec.uniform_mix, max_is_weight=spec.max_is_weight, smoothing=spec.smoothing,
    )  # fmt: skip
    estimate = {"t": grid.tolist(), "m": means.tolist(), "v": variances.tolist(), "w": shape.tolist()}
    return proposal, estimate


# Held-out loss scoring: DiffusionSpec's defaults for these (the ELBO weight, per-sequence
# normalisation, response tokens only, EOS padding at full weight), whatever the run trains with.
HELDOUT_SCORING = ("loss_weight", "loss_norm", "include_prompt_ratio", "mask_eps", "eos_padding_weight")


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    cfg: TrainConfig,
    batch: TrainBatch,
    *,
    mask_token_id: int,
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    seed: int = 0,
    block_size: int | None = None,
) -> float:
    """The diffusion loss of `batch` averaged over the fixed t grid `validation.t_grid`, one view
    per t with masks from a generator seeded by `seed`: the same number for the same weights, so
    the values of a run are comparable step to step (the training loss draws new t and masks).
    Which tokens count and how they weigh is one fixed rule (`HELDOUT_SCORING`), not the run's
    recipe, so runs of different recipes (an ablation grid) are comparable too."""
    fixed = {name: DiffusionSpec.model_fields[name].default for name in HELDOUT_SCORING}
    cfg = cfg.model_copy(update={"diffusion": cfg.diffusion.model_copy(update=fixed)})
    generator = torch.Generator().manual_seed(seed)
    features = encode_images(batch.pixel_values) if batch.pixel_values.numel() else None
    was_training = model.training
    model.eval()
    losses = []
    for t in cfg.validation.t_grid:
        level = torch.full((batch.input_ids.shape[0],), t)
        noised = make_views(cfg, batch, mask_token_id, generator, t=level, views="single")
        out = _forward_views(model, batch, noised, features, block_size)
        losses.append(_diffusion_loss(cfg, batch, noised, out, None))
    model.train(was_training)
    return float(torch.stack([loss.value for loss in losses]).mean())


def training_step(
    model: torch.nn.Module,
    cfg: TrainConfig,
    batch: TrainBatch,
    generator: torch.Generator,
    prior: RouterPriorEMA | None,
    *,
    mask_token_id: int,
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    collect_routing: bool = False,
    blank_image: torch.Tensor | None = None,
    proposal: Proposal | None = None,
    block_size: int | None = None,
) -> StepOutput:
    """Forward all views in one call and return the weighted loss with its parts.

    `encode_images` runs the vision tower; it is called once per batch and its features are shared
    by both views of every sample (EBCMC: the tower runs once per complementary pair).
    `blank_image` ([1, 3, S, S]), when given, goes through the tower with weight 0 in a batch
    without images: data-parallel ranks reduce gradients bucket by bucket in lockstep, so every
    rank's backward must reach the vision parameters even when its batch is text only.
    `proposal`: P-POTS's fitted sampler of t (`timesteps.kind: ppots`); each row's loss is then
    weighted by its importance weight, the same for both views of a pair (they share t).
    `block_size`: block diffusion with blocks of this size (`block_layout`)."""
    t, is_weight = sample_t(cfg, batch.input_ids.shape[0], generator, proposal)
    noised = make_views(cfg, batch, mask_token_id, generator, t=t)
    features = encode_images(batch.pixel_values) if batch.pixel_values.numel() else None
    out = _forward_views(model, batch, noised, features, block_size)
    visible = noised.visible(batch.attention_mask)
    losses = cfg.losses
    row_weight = None if is_weight is None else is_weight.repeat(noised.num_views)
    diff = _diffusion_loss(cfg, batch, noised, out, row_weight)
    balance, z = _router_losses(cfg, out, noised, visible, batch.attention_mask.repeat(noised.num_views, 1))
    total = diff.value + losses.lambda_bal * balance.value + losses.lambda_z * z.value
    if features is None and blank_image is not None:
        total = total + 0.0 * encode_images(blank_image).sum()
    metrics = {
        "loss_diffusion": diff.value.item(),
        "loss_bal": balance.value.item(),
        "loss_z": z.value.item(),
        **_supervision_counts(batch, noised, diff),
    }
    extra, consistency = _optional_terms(cfg, batch, noised, out, visible, prior)
    for name, (weight, term) in extra.items():
        metrics[name] = term.value.item()
        if weight > 0:  # the consistency term is logged with two views even when it is not trained
            total = total + weight * term.value
    metrics["loss"] = total.item()
    routing = {}
    if collect_routing and out.router_probs:
        routing = _routing_stats(out, noised, batch, visible, cfg.diffusion.num_t_buckets, consistency)
    return StepOutput(total, metrics, routing)


def ar_training_step(
    model: torch.nn.Module,
    cfg: TrainConfig,
    batch: TrainBatch,
    *,
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    blank_image: torch.Tensor | None = None,
) -> StepOutput:
    """`objective: ar`: next-token cross-entropy under the causal mask (the AR pretraining and
    baselines of the MiniMind → LLaDA2.0 route), on every answer token and its own EOS (not the
    EOS padding), plus the router's global balance and z losses."""
    features = encode_images(batch.pixel_values) if batch.pixel_values.numel() else None
    documents = batch.document_ids
    out = model(batch.input_ids, batch.attention_mask.long(), image_features=features, document_ids=documents)
    supervised = (batch.response_mask & ~batch.eos_padding_mask)[:, 1:]
    if documents is not None:  # a document's last token does not predict the next document's first
        supervised = supervised & (documents[:, 1:] == documents[:, :-1])
    logits = out.logits[:, :-1][supervised].float()
    ar = torch.nn.functional.cross_entropy(logits, batch.input_ids[:, 1:][supervised])
    mask = batch.attention_mask
    balance, z = LossOutput(ar.new_zeros(())), LossOutput(ar.new_zeros(()))
    if out.router_probs:  # one global balance bucket: there is no t
        everything = torch.zeros_like(mask[:, 0]).long()
        balance = stratified_balance_loss(out.router_probs, out.router_topk, mask, everything, 1)
        z = router_z_loss(out.router_logits, mask)
    total = ar + cfg.losses.lambda_bal * balance.value + cfg.losses.lambda_z * z.value
    if features is None and blank_image is not None:  # see training_step
        total = total + 0.0 * encode_images(blank_image).sum()
    count = float(supervised.sum())
    metrics = {"loss": total.item(), "loss_ar": ar.item(), "loss_bal": balance.value.item()}
    metrics |= {"loss_z": z.value.item(), "masked_tokens": count, "eligible_tokens": count}
    metrics |= {"zero_supervision_samples": 0.0, "samples": float(len(mask)), "tokens": float(mask.sum())}
    metrics["t_mean"] = 0.0
    return StepOutput(total, metrics)


def _forward_views(
    model: torch.nn.Module,
    batch: TrainBatch,
    noised: NoisedBatch,
    features: torch.Tensor | None,
    block_size: int | None = None,
) -> DiMoEOutput:
    """One model call on all views stacked along the batch; the image features are shared. With
    `block_size` shorter than the response, block diffusion (`block_layout`); at least as long, the
    `prefix` mask over the whole response (a `block` model's full-sequence steps)."""
    views = noised.num_views
    attention_mask = batch.attention_mask.repeat(views, 1)
    prefix_mask = batch.prefix_mask.repeat(views, 1)
    features = torch.cat([features] * views) if features is not None else None
    documents = batch.document_ids.repeat(views, 1) if batch.document_ids is not None else None
    response = int(batch.response_mask.sum(dim=1).max())
    if block_size is None:  # the model's own mask
        return model(
            noised.noisy_ids, attention_mask.long(), prefix_mask=prefix_mask, image_features=features,
            document_ids=documents,
        )  # fmt: skip
    if block_size >= response:  # masked diffusion over the whole response, whatever the model's mask
        positions, mask = whole_response_layout(attention_mask, prefix_mask, documents)
        return model(noised.noisy_ids, attention_mask.long(), image_features=features, position_ids=positions,
                     layout_mask=mask)  # fmt: skip
    clean = batch.input_ids[:, -response:].repeat(views, 1)
    ids, real, positions, mask = block_layout(
        noised.noisy_ids, clean, attention_mask, prefix_mask, block_size, documents
    )
    noisy = slice(0, noised.noisy_ids.shape[1])
    out = model(
        ids,
        real.long(),
        image_features=features,
        position_ids=positions,
        layout_mask=mask,
        logits_positions=noisy,
    )
    # The routing losses and telemetry read the noisy sequence, as without blocks.
    for name in ("router_logits", "router_probs", "router_topk"):
        setattr(out, name, tuple(per_layer[:, noisy] for per_layer in getattr(out, name)))
    return out


def whole_response_layout(
    attention_mask: torch.Tensor, prefix_mask: torch.Tensor, document_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and the `prefix` mask over the whole response (masked diffusion without blocks),
    per document in packed rows."""
    real, prefix = attention_mask.bool(), prefix_mask.bool() & attention_mask.bool()
    mask = build_attention_mask(real, prefix, prefix)
    return token_positions(real, document_ids), within_documents(mask, document_ids)


def block_layout(
    noisy_ids: torch.Tensor,
    clean_response: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix_mask: torch.Tensor,
    block_size: int,
    document_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block diffusion in one forward (LLaDA2.0's objective, BD3-LM's construction, Arriola et al.
    2025, arXiv:2503.09573): the noisy sequence [prompt, x_t] followed by the clean response x_0,
    whose copies share positions; noisy block j sees the prompt, itself and the clean blocks before
    j, so its logits are those of denoising block j given the clean earlier blocks. Rows are
    left-padded with every response ending the row. With `document_ids` (packed rows) blocks and
    positions restart at each document and no token sees another document. Returns ids, real-token
    mask, positions, mask."""
    from dimoe.model.attention import CLEAN, NOISY, PROMPT, block_diffusion_mask, response_blocks

    response = clean_response.shape[1]
    real = torch.cat([attention_mask, attention_mask[:, -response:]], dim=1).bool()
    positions = token_positions(attention_mask.bool(), document_ids)
    positions = torch.cat([positions, positions[:, -response:]], dim=1)
    blocks = response_blocks(prefix_mask.bool(), attention_mask.bool(), block_size, document_ids)
    blocks = torch.cat([blocks, blocks[:, -response:]], dim=1)
    noisy = torch.where(blocks[:, :-response] >= 0, NOISY, PROMPT)
    copy = torch.cat([noisy, torch.full_like(clean_response, CLEAN)], dim=1)
    mask = block_diffusion_mask(copy, blocks, copy, blocks, real)
    if document_ids is not None:  # the clean copy belongs to the documents it copies
        mask = within_documents(mask, torch.cat([document_ids, document_ids[:, -response:]], dim=1))
    return torch.cat([noisy_ids, clean_response], dim=1), real, positions, mask


def _diffusion_loss(
    cfg: TrainConfig,
    batch: TrainBatch,
    noised: NoisedBatch,
    out: DiMoEOutput,
    row_weight: torch.Tensor | None,
) -> LossOutput:
    token_weight, answer_lengths = _eos_padding_weights(cfg, batch, noised)
    return masked_diffusion_loss(
        out.logits, batch.input_ids.repeat(noised.num_views, 1), noised.masked, noised.p,
        loss_weight=cfg.diffusion.loss_weight, loss_norm=cfg.diffusion.loss_norm,
        answer_lengths=answer_lengths, token_weight=token_weight, row_weight=row_weight,
    )  # fmt: skip


def _router_losses(
    cfg: TrainConfig, out: DiMoEOutput, noised: NoisedBatch, visible: torch.Tensor, real: torch.Tensor
) -> tuple[LossOutput, LossOutput]:
    """The balance and z losses of the routers; zero for a dense model (no MoE layer)."""
    if not out.router_probs:
        zero = LossOutput(out.logits.new_zeros(()))
        return zero, zero
    return _balance_loss(cfg, out, noised, visible), router_z_loss(out.router_logits, real)


def _balance_loss(
    cfg: TrainConfig, out: DiMoEOutput, noised: NoisedBatch, visible: torch.Tensor
) -> LossOutput:
    """Load balance per t-bucket (DMAR, docs/design.md §4), or over one global bucket: the ordinary
    Switch loss of the naive baseline."""
    if cfg.losses.stratified_balance:
        bucket, num_buckets = noised.bucket, cfg.diffusion.num_t_buckets
    else:
        bucket, num_buckets = torch.zeros_like(noised.bucket), 1
    return stratified_balance_loss(out.router_probs, out.router_topk, visible, bucket, num_buckets)


def _optional_terms(
    cfg: TrainConfig,
    batch: TrainBatch,
    noised: NoisedBatch,
    out: DiMoEOutput,
    visible: torch.Tensor,
    prior: RouterPriorEMA | None,
) -> tuple[dict[str, tuple[float, LossOutput]], LossOutput | None]:
    """The terms a stage switches on, as metric name -> (weight, loss) in the order they are added
    (a float sum depends on the order): the routing prior (DMAR), the view consistency (EBCMC; also
    returned for the routing stats) and CAP (docs/design.md §4)."""
    losses, k = cfg.losses, cfg.diffusion.num_t_buckets
    terms: dict[str, tuple[float, LossOutput]] = {}
    routed = bool(out.router_probs)  # a dense model has no router
    if losses.lambda_prior > 0 and prior is not None and routed:
        with torch.no_grad():
            prior.update(mean_router_distribution(out.router_probs, visible))
        prior_loss = routing_prior_loss(out.router_probs, visible, noised.bucket, k, prior.prior)
        terms["loss_prior"] = (losses.lambda_prior, prior_loss)
    consistency = None
    if noised.num_views == 2 and routed:
        b = batch.input_ids.shape[0]
        consistency = view_consistency_loss(
            [p[:b] for p in out.router_probs],
            [p[b:] for p in out.router_probs],
            noised.visible_in_both(batch.attention_mask),
            [t[:b] for t in out.router_topk],
            [t[b:] for t in out.router_topk],
        )
        terms["loss_cons"] = (losses.lambda_cons, consistency)
    if losses.lambda_cap > 0:
        targets = batch.input_ids.repeat(noised.num_views, 1)
        terms["loss_cap"] = (losses.lambda_cap, cap_confidence_loss(out.logits, targets, noised.masked))
    return terms, consistency


def _supervision_counts(batch: TrainBatch, noised: NoisedBatch, diff: LossOutput) -> dict[str, float]:
    """How much of the batch the views supervise (problem D of docs/design.md §4)."""
    return {
        "masked_tokens": float(diff.stats["masked_tokens"]),
        "eligible_tokens": float(noised.eligible.sum()),
        "zero_supervision_samples": float(_zero_supervision_samples(noised)),
        "samples": float(batch.input_ids.shape[0]),
        "tokens": float(batch.attention_mask.sum() * noised.num_views),
        "t_mean": noised.t.mean().item(),
    }


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
def _routing_stats(
    out: DiMoEOutput,
    noised: NoisedBatch,
    batch: TrainBatch,
    visible: torch.Tensor,
    num_buckets: int,
    consistency: LossOutput | None,
) -> dict[str, Any]:
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
