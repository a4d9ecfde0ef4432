"""Schema of `configs/tune/*.yaml`: an ablation grid of named variants over a base training stage."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from dimoe.config.base import StrictModel
from dimoe.config.train import TrackingSpec


class VariantSpec(StrictModel):
    """One ablation: `--set` overrides over the base stage, optionally followed by a second stage
    (e.g. the low-NFE stage) trained from the variant's final checkpoint."""

    description: str = ""
    set: list[str] = Field(default_factory=list)
    then: str | None = None  # train config of a follow-up stage, started from this variant's weights
    then_set: list[str] = Field(default_factory=list)


class TrialEvalSpec(StrictModel):
    config: str = "configs/eval/default.yaml"
    suite: str = "demo"
    tasks: list[str] = Field(default_factory=list)  # a subset of the suite; empty = the whole suite
    presets: list[str] = Field(default_factory=lambda: ["best", "fast"])
    set: list[str] = Field(default_factory=list)  # overrides of the eval config (data_root, max_samples…)
    decode: dict[str, Any] = Field(default_factory=dict)  # decoding fields over every preset
    batch_size: int = Field(32, ge=1)


class TuneConfig(StrictModel):
    name: str = "ablations"
    storage_path: str = "artifacts/tune"
    base_stage: str  # the training stage every variant starts from (`base:` is the loader's inheritance key)
    base_set: list[str] = Field(default_factory=list)  # overrides shared by every variant (budgets, paths)
    variants: dict[str, VariantSpec]
    groups: dict[str, list[str]] = Field(default_factory=dict)  # named lists of variants ("core", "extra")
    run: list[str] = Field(default_factory=lambda: ["core"])  # variants or group names to run
    seeds: list[int] = Field(default_factory=lambda: [0])
    max_concurrent_trials: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=0)  # retries of a failed trial (it resumes from its checkpoints)
    eval: TrialEvalSpec = Field(default_factory=TrialEvalSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)  # each trial's config and results

    @model_validator(mode="after")
    def _known_names(self) -> TuneConfig:
        for group, members in self.groups.items():
            unknown = [m for m in members if m not in self.variants]
            if unknown:
                raise ValueError(
                    f"groups.{group}: unknown variant(s) {unknown}; variants are {list(self.variants)}"
                )
        self.selected(self.run)
        return self

    def selected(self, names: list[str]) -> list[str]:
        """Variant names of `names` (variants or groups), in order, without repeats."""
        out: list[str] = []
        for name in names:
            if name in self.groups:
                members = self.groups[name]
            elif name in self.variants:
                members = [name]
            else:
                raise ValueError(
                    f"unknown variant or group {name!r}; variants: {', '.join(self.variants)}; "
                    f"groups: {', '.join(self.groups) or 'none'}"
                )
            out += [m for m in members if m not in out]
        return out
