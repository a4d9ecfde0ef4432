"""Training-side diffusion math: timestep samplers, the forward (masking) process and the losses.

Nothing here knows the model: the losses take logits, router probabilities / logits and top-k
indices as plain tensors.
"""

from dimoe.diffusion.forward import (
    DEFAULT_MASK_EPS,
    NoisedBatch,
    complementary_views,
    eligible_positions,
    independent_views,
    mask_probability,
    mask_tokens,
    mirror_views,
    single_view,
)
from dimoe.diffusion.losses import (
    LossOutput,
    RouterPriorEMA,
    cap_confidence_loss,
    masked_diffusion_loss,
    mean_router_distribution,
    per_row_diffusion_loss,
    router_z_loss,
    routing_prior_loss,
    stratified_balance_loss,
    view_consistency_loss,
)
from dimoe.diffusion.timesteps import (
    TIMESTEP_KINDS,
    band,
    logit_normal,
    sample_timesteps,
    stratified,
    t_to_bucket,
    uniform,
)

__all__ = [
    "DEFAULT_MASK_EPS",
    "TIMESTEP_KINDS",
    "LossOutput",
    "NoisedBatch",
    "RouterPriorEMA",
    "band",
    "cap_confidence_loss",
    "complementary_views",
    "eligible_positions",
    "independent_views",
    "logit_normal",
    "mask_probability",
    "mask_tokens",
    "masked_diffusion_loss",
    "mean_router_distribution",
    "mirror_views",
    "per_row_diffusion_loss",
    "router_z_loss",
    "routing_prior_loss",
    "sample_timesteps",
    "single_view",
    "stratified",
    "stratified_balance_loss",
    "t_to_bucket",
    "uniform",
    "view_consistency_loss",
]
