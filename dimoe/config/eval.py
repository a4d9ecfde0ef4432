"""Schema of `configs/eval/*.yaml`: evaluation suites and where each task's data lives."""

from __future__ import annotations

from pydantic import Field, model_validator

from dimoe.config.base import StrictModel
from dimoe.config.train import TrackingSpec


class TaskData(StrictModel):
    path: str  # relative to data_root unless absolute
    max_samples: int | None = Field(None, gt=0)
    # Response tokens to generate for this task (its answers' length, like lmms-eval's
    # max_new_tokens); None: the preset's. A run's explicit --gen-length wins over it.
    gen_length: int | None = Field(None, gt=0)


class EvalConfig(StrictModel):
    data_root: str = "artifacts/data/demo"
    suites: dict[str, list[str]] = Field(default_factory=dict)
    tasks: dict[str, TaskData] = Field(default_factory=dict)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)  # a run's scores to MLflow / W&B

    @model_validator(mode="after")
    def _suites_name_known_tasks(self) -> EvalConfig:
        for suite, names in self.suites.items():
            unknown = [n for n in names if n not in self.tasks]
            if unknown:
                raise ValueError(f"suite {suite!r} lists tasks with no `tasks:` entry: {', '.join(unknown)}")
        return self
