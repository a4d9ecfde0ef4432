"""Schema of `configs/infer/*.yaml`: decoding presets and batching (docs/design.md §5).

A preset fixes every decoding knob; a run picks one by name and may override any field::

    config = load_config("configs/infer/default.yaml", InferConfig, ["presets.mid.threshold=0.8"])
    settings = config.resolve("mid", {"steps": 12, "strategy": "llada"})
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from dimoe.config.base import StrictModel
from dimoe.config.loader import ConfigError, format_validation_error

STRATEGIES = ("threshold", "llada")
REMASKING = ("low_confidence", "random")
CACHES = ("none", "prefix", "block")


def _one_of(kind: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r} (valid: {', '.join(valid)})")
    return value


class DecodeSettings(StrictModel):
    """Every knob of one decoding run (a preset after overrides).

    steps is the total number of denoising steps over the whole generation; the G = gen_length
    response tokens are decoded in G / block_length blocks, left to right, steps / num_blocks
    steps each (LLaDA's semi-autoregressive schedule)."""

    strategy: str = "threshold"
    steps: int = Field(16, gt=0)
    gen_length: int = Field(64, gt=0)
    block_length: int = Field(32, gt=0)
    threshold: float = Field(0.9, ge=0.0)  # `threshold` strategy: reveal tokens with confidence >= this
    temperature: float = Field(0.0, ge=0.0)  # 0 = greedy; > 0 = Gumbel-max sampling
    top_k: int = Field(0, ge=0)  # sample among the k most likely tokens of a position (0 = all)
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # ... or among its top-p nucleus (1 = all)
    remasking: str = "low_confidence"  # `llada` strategy: which tokens a step reveals
    cfg_scale: float = Field(0.0, ge=0.0)  # classifier-free guidance, both strategies (0 = off)
    # `threshold` strategy, LLaDA2.0's per-step cap on the confident tokens revealed: a fraction of
    # the block ramping from cap_start_ratio (first step of a block) to cap_end_ratio (last), and
    # at most max_decode_per_step (0 = no limit); 1.0 / 1.0 / 0 = no cap
    cap_start_ratio: float = Field(1.0, gt=0.0, le=1.0)
    cap_end_ratio: float = Field(1.0, gt=0.0, le=1.0)
    max_decode_per_step: int = Field(0, ge=0)
    # Keys/values reused across steps (dimoe.infer.engine.ModelLogits): `none`; `prefix`, the prompt's,
    # computed once (exact; `prefix`-mask models only, `none` for others); `block`, every position
    # outside the current block, refreshed at each block (Fast-dLLM's DualCache: approximate).
    cache: str = "prefix"
    seed: int = 0

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        return _one_of("strategy", value, STRATEGIES)

    @field_validator("remasking")
    @classmethod
    def _known_remasking(cls, value: str) -> str:
        return _one_of("remasking", value, REMASKING)

    @field_validator("cache")
    @classmethod
    def _known_cache(cls, value: str) -> str:
        return _one_of("cache", value, CACHES)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @model_validator(mode="after")
    def _schedule_fits(self) -> DecodeSettings:
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length={self.gen_length} must be a multiple of block_length={self.block_length}"
            )
        if self.steps % self.num_blocks:
            raise ValueError(
                f"steps={self.steps} must be a multiple of the number of blocks "
                f"(gen_length / block_length = {self.num_blocks})"
            )
        if self.steps > self.gen_length:
            raise ValueError(
                f"steps={self.steps} exceeds gen_length={self.gen_length}: a step would reveal nothing"
            )
        if self.strategy == "threshold" and self.remasking != "low_confidence":
            raise ValueError("the threshold strategy ranks by confidence: it needs remasking=low_confidence")
        if self.strategy == "threshold" and self.cfg_scale > 0:
            raise ValueError("cfg_scale > 0 is supported by the llada strategy only")
        return self


def _fit_schedule(base: DecodeSettings, given: dict[str, Any]) -> dict[str, Any]:
    """`given` plus the block_length and steps that fit the preset's schedule to a given gen_length
    (see InferConfig.resolve). A gen_length that is not a positive int is left to validation."""
    gen_length = given.get("gen_length", base.gen_length)
    if not isinstance(gen_length, int) or gen_length <= 0:
        return given
    fitted = dict(given)
    if "block_length" not in given and gen_length % base.block_length:
        fitted["block_length"] = gen_length
    block_length = fitted.get("block_length", base.block_length)
    fits = isinstance(block_length, int) and block_length > 0 and gen_length % block_length == 0
    if "steps" not in given and fits:
        blocks = gen_length // block_length
        fitted["steps"] = -(-min(base.steps, gen_length) // blocks) * blocks  # ceil to whole blocks
    return fitted


def _default_presets() -> dict[str, DecodeSettings]:
    return {name: DecodeSettings(steps=steps) for name, steps in (("fast", 8), ("mid", 16), ("best", 32))}


class InferConfig(StrictModel):
    presets: dict[str, DecodeSettings] = Field(default_factory=_default_presets)
    default_preset: str = "mid"
    batch_size: int = Field(8, gt=0)  # requests decoded together in one batch

    @model_validator(mode="after")
    def _default_exists(self) -> InferConfig:
        self.preset(self.default_preset)
        return self

    def preset(self, name: str) -> DecodeSettings:
        if name not in self.presets:
            raise ValueError(f"unknown preset {name!r} (valid: {', '.join(self.presets)})")
        return self.presets[name]

    def resolve(self, preset: str | None = None, overrides: dict[str, Any] | None = None) -> DecodeSettings:
        """The settings of `preset` (default: `default_preset`) with `overrides` applied; None values
        are ignored so a CLI can pass every flag. Raises ConfigError naming the bad field.

        When the overrides pick a gen_length but not the schedule (a task's answer length, an OpenAI
        client's max_tokens), the preset's schedule is fitted to it, so every preset works at every
        length: one block when the preset's block_length does not divide gen_length, and the
        preset's steps read as a budget — at most one step per token, rounded up to a whole number
        per block. So at gen_length 8 `best` (32 steps) decodes in 8 steps, one token each, which is
        already the finest schedule there is. Explicit steps / block_length are never changed."""
        name = preset or self.default_preset
        try:
            base = self.preset(name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        given = {key: value for key, value in (overrides or {}).items() if value is not None}
        try:
            return DecodeSettings.model_validate({**base.model_dump(), **_fit_schedule(base, given)})
        except ValidationError as exc:
            raise ConfigError(
                format_validation_error(exc, f"preset {name!r} with overrides {given}")
            ) from None
