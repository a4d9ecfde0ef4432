"""Forward (noising) process of masked diffusion: which tokens may be masked, and masking them.

A sample at noise level t has each *eligible* token independently replaced by the mask token with
probability p(t) = (1 - eps) t + eps (LLaDA's forward process with a floor eps so that p > 0 and the
ELBO weight 1/p stays finite). Eligible tokens are all response tokens plus a random fraction of
prompt text tokens; image tokens and padding are never eligible.

Two-view batches (EBCMC) put the two views of sample i in rows i and i + B of a `NoisedBatch`, so
the trainer can run the backbone once on the concatenation and split the outputs with ``[:B]`` and
``[B:]``. Buckets always partition the full noise range t in [0, 1] into ``num_buckets`` equal
buckets, so bucket statistics are comparable across stages whatever t band a stage samples from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dimoe.diffusion.timesteps import t_to_bucket

DEFAULT_MASK_EPS = 1e-3


@dataclass(frozen=True)
class NoisedBatch:
    """Noised token ids plus everything the losses need, for ``num_views`` views stacked on rows.

    Row ``v * B + i`` is view ``v`` of sample ``i`` (B = original batch size). Shapes: [N, L] for
    token tensors and [N] for per-row tensors, N = num_views * B.
    """

    noisy_ids: torch.Tensor  # Long[N, L], masked tokens replaced by the mask token id
    masked: torch.Tensor  # Bool[N, L], positions replaced by the mask token (the supervised ones)
    eligible: torch.Tensor  # Bool[N, L], positions that could be masked
    t: torch.Tensor  # Float[N], nominal noise level of the row
    p: torch.Tensor  # Float[N], mask probability p(t); the ELBO weight is 1 / p
    bucket: torch.Tensor  # Long[N], t-bucket of the row over [0, 1]
    view: torch.Tensor  # Long[N], view index of the row (0 or 1)
    num_views: int

    @property
    def answer_lengths(self) -> torch.Tensor:
        """Eligible-token count per row, Long[N] (the LLaDA SFT normaliser)."""
        return self.eligible.sum(dim=1)

    @property
    def mask_ratio(self) -> torch.Tensor:
        """Realised fraction of eligible tokens that are masked per row, Float[N] (0 if none eligible)."""
        return self.masked.sum(dim=1) / self.answer_lengths.clamp(min=1)

    def visible(self, real: torch.Tensor) -> torch.Tensor:
        """Bool[N, L]: real (non-pad) tokens left unmasked; ``real`` is Bool[B, L] for the clean batch."""
        return real.repeat(self.num_views, 1) & ~self.masked

    def visible_in_both(self, real: torch.Tensor) -> torch.Tensor:
        """Bool[B, L]: real tokens unmasked in both views of a two-view batch (for consistency losses)."""
        if self.num_views != 2:
            raise ValueError(f"visible_in_both needs a two-view batch, this one has {self.num_views} view(s)")
        batch = real.shape[0]
        return real & ~self.masked[:batch] & ~self.masked[batch:]


def mask_probability(t: torch.Tensor, eps: float = DEFAULT_MASK_EPS) -> torch.Tensor:
    """p(t) = (1 - eps) t + eps: the per-token mask probability at noise level t."""
    return (1.0 - eps) * t + eps


def eligible_positions(
    response_mask: torch.Tensor,
    prompt_text_mask: torch.Tensor,
    include_prompt_ratio: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Bool[B, L] of maskable positions.

    Every response token is eligible; each prompt text token is independently eligible with
    probability ``include_prompt_ratio``. Both masks must already exclude image and pad tokens
    (the caller owns the token layout), so those are never eligible.
    """
    if not 0.0 <= include_prompt_ratio <= 1.0:
        raise ValueError(f"include_prompt_ratio must be in [0, 1], got {include_prompt_ratio}")
    if response_mask.shape != prompt_text_mask.shape:
        raise ValueError(
            f"response_mask {tuple(response_mask.shape)} and prompt_text_mask "
            f"{tuple(prompt_text_mask.shape)} must have the same shape"
        )
    draw = torch.rand(prompt_text_mask.shape, generator=generator, device=generator.device)
    chosen_prompt = prompt_text_mask.bool() & (draw.to(prompt_text_mask.device) < include_prompt_ratio)
    return response_mask.bool() | chosen_prompt


def mask_tokens(
    input_ids: torch.Tensor,
    eligible: torch.Tensor,
    p: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each eligible token of row i independently with probability p[i].

    Returns ``(noisy_ids, masked)``: Long[B, L] ids with masked positions set to ``mask_token_id``,
    and the Bool[B, L] mask of replaced positions (always a subset of ``eligible``).
    """
    if p.dim() != 1 or p.shape[0] != input_ids.shape[0]:
        raise ValueError(f"p must have shape [{input_ids.shape[0]}], got {tuple(p.shape)}")
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError("mask probabilities p must lie in [0, 1]")
    draw = torch.rand(input_ids.shape, generator=generator, device=generator.device).to(input_ids.device)
    masked = eligible.bool() & (draw < p[:, None])
    return _apply_mask(input_ids, masked, mask_token_id), masked


def _apply_mask(input_ids: torch.Tensor, masked: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    return torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)


def _stack_views(
    input_ids: torch.Tensor,
    eligible: torch.Tensor,
    views: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    mask_token_id: int,
    num_buckets: int,
) -> NoisedBatch:
    """Concatenate views given as (t, p, masked) triples along the batch dimension."""
    t = torch.cat([view_t for view_t, _, _ in views])
    masked = torch.cat([view_masked for _, _, view_masked in views])
    batch = input_ids.shape[0]
    return NoisedBatch(
        noisy_ids=_apply_mask(input_ids.repeat(len(views), 1), masked, mask_token_id),
        masked=masked,
        eligible=eligible.bool().repeat(len(views), 1),
        t=t,
        p=torch.cat([view_p for _, view_p, _ in views]),
        bucket=t_to_bucket(t, num_buckets),
        view=torch.arange(len(views), device=t.device).repeat_interleave(batch),
        num_views=len(views),
    )


def single_view(
    input_ids: torch.Tensor,
    eligible: torch.Tensor,
    t: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator,
    *,
    num_buckets: int = 1,
    eps: float = DEFAULT_MASK_EPS,
) -> NoisedBatch:
    """One noised view per sample at noise level t (the plain LLaDA forward process)."""
    p = mask_probability(t, eps)
    _, masked = mask_tokens(input_ids, eligible, p, mask_token_id, generator)
    return _stack_views(input_ids, eligible, [(t, p, masked)], mask_token_id, num_buckets)


def complementary_views(
    input_ids: torch.Tensor,
    eligible: torch.Tensor,
    t: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator,
    *,
    num_buckets: int = 1,
    eps: float = DEFAULT_MASK_EPS,
) -> NoisedBatch:
    """Two views per sample whose masks are exact complements over the eligible tokens (EBCMC).

    View A masks each eligible token with p_A = p(t). View B masks exactly the eligible tokens A
    left visible, so every eligible token is supervised exactly once per pair (no sample goes
    unsupervised, problem D). B's mask is marginally Bernoulli(1 - p_A) = Bernoulli((1 - eps)(1 - t))
    per token; its row gets t_B = 1 - t and p_B = p(1 - t) = (1 - eps)(1 - t) + eps, and the ELBO
    weight of view B is 1 / p_B. Using p(1 - t) rather than the exact 1 - p_A (or the realised
    ratio) keeps the eps floor, so the weight stays <= 1 / eps when t -> 1 instead of diverging.
    The realised ratio of each view is available as ``NoisedBatch.mask_ratio``.
    """
    p_a = mask_probability(t, eps)
    _, masked_a = mask_tokens(input_ids, eligible, p_a, mask_token_id, generator)
    masked_b = eligible.bool() & ~masked_a
    t_b = 1.0 - t
    views = [(t, p_a, masked_a), (t_b, mask_probability(t_b, eps), masked_b)]
    return _stack_views(input_ids, eligible, views, mask_token_id, num_buckets)


def independent_views(
    input_ids: torch.Tensor,
    eligible: torch.Tensor,
    t_a: torch.Tensor,
    t_b: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator,
    *,
    num_buckets: int = 1,
    eps: float = DEFAULT_MASK_EPS,
) -> NoisedBatch:
    """Two independently masked views per sample at levels t_a and t_b (the "+DMAR only" ablation).

    Passing ``t_b = 1 - t_a`` gives the same noise levels as `complementary_views`, so the ablation
    changes only the coupling of the two masks, not the t distribution.
    """
    p_a, p_b = mask_probability(t_a, eps), mask_probability(t_b, eps)
    _, masked_a = mask_tokens(input_ids, eligible, p_a, mask_token_id, generator)
    _, masked_b = mask_tokens(input_ids, eligible, p_b, mask_token_id, generator)
    views = [(t_a, p_a, masked_a), (t_b, p_b, masked_b)]
    return _stack_views(input_ids, eligible, views, mask_token_id, num_buckets)


def mirror_views(
    input_ids: torch.Tensor,
    eligible: torch.Tensor,
    t: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator,
    *,
    num_buckets: int = 1,
    eps: float = DEFAULT_MASK_EPS,
) -> NoisedBatch:
    """Two views per sample at the same t whose masks come from reflected uniforms (MIRROR,
    StableDLLM): token j is masked in view A when u_j < p(t) and in view B when 1 - u_j < p(t).

    Each view alone is the plain forward process (Bernoulli(p) per token, so the loss of each is
    unbiased); together they are negatively correlated: P(both) = max(0, 2p - 1) < p², so the
    mean of the two losses varies less than two independent masks. For p <= 1/2 the masks are
    disjoint, and their union covers a 2p share of the tokens."""
    p = mask_probability(t, eps)
    u = torch.rand(input_ids.shape, generator=generator, device=generator.device).to(input_ids.device)
    masked_a = eligible.bool() & (u < p[:, None])
    masked_b = eligible.bool() & ((1.0 - u) < p[:, None])
    return _stack_views(input_ids, eligible, [(t, p, masked_a), (t, p, masked_b)], mask_token_id, num_buckets)
