"""Block sizes of block diffusion over the steps (`block_size_at`), and learning-rate schedules
as multipliers of each group's base LR: linear warmup, then cosine to
`min_lr_ratio`, WSD (warmup–stable–decay: flat, then linear decay over the last
`decay_fraction` of steps), or constant.

`step` counts optimizer steps (DeepSpeed advances the scheduler once per `grad_accum` micro-batches),
while `max_steps` counts micro-batches, so the schedule spans `max_steps // grad_accum` steps."""

from __future__ import annotations

import math

from dimoe.config.train import TrainConfig


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    s = cfg.schedule
    total = max(cfg.max_steps // cfg.grad_accum, 1)
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.kind == "constant":
        return 1.0
    if s.kind == "cosine":
        progress = (step - s.warmup_steps) / max(total - s.warmup_steps, 1)
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = total - int(total * s.decay_fraction)
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(total - decay_start, 1)
    return 1.0 - (1.0 - s.min_lr_ratio) * min(progress, 1.0)


def block_size_at(step: int, cfg: TrainConfig) -> int | None:
    """The block size of block diffusion at `step` (None: the whole response, plain masked
    diffusion): `diffusion.block_schedule`'s warmup–stable–decay, else `diffusion.block_size`."""
    d = cfg.diffusion
    if d.block_schedule is None:
        return d.block_size
    ratios, total = d.block_schedule.phase_ratios, cfg.max_steps
    warmup_end, stable_end = round(ratios[0] * total), round((ratios[0] + ratios[1]) * total)
    if step < warmup_end:
        sizes, start, length = d.block_schedule.warmup_sizes, 0, warmup_end
    elif step < stable_end:
        return None
    else:
        sizes, start, length = d.block_schedule.decay_sizes, stable_end, total - stable_end
    return sizes[min((step - start) * len(sizes) // max(length, 1), len(sizes) - 1)]


def final_block_size(cfg: TrainConfig) -> int | None:
    """The block size the run ends with: the exported model decodes with it."""
    if cfg.diffusion.block_schedule is not None:
        return cfg.diffusion.block_schedule.decay_sizes[-1]
    return cfg.diffusion.block_size


WHOLE_RESPONSE = 2**31 - 1  # a block size no response reaches: masked diffusion over all of it


def model_block_size(size: int | None, attention: str) -> int | None:
    """The block size a training forward is given: a `block` model must be told when a step is
    full-sequence diffusion (its own mask would cut the response into its configured blocks)."""
    return WHOLE_RESPONSE if size is None and attention == "block" else size
