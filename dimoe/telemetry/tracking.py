"""Experiment tracking through Ray's integrations (docs/design.md §8): MLflow or W&B for training
(rank 0 of the Ray Train workers), Tune (a logger callback on the driver) and evaluation runs.

MLflow writes to a local file store (`<output_dir>/mlruns`) unless a tracking URI is configured;
W&B runs offline (files under `<output_dir>/wandb`, `wandb sync` uploads them) when no
WANDB_API_KEY is set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dimoe.config.train import TrackingSpec
from dimoe.errors import UserError


def mlflow_uri(spec: TrackingSpec, output_dir: Path) -> str:
    """The configured URI, else a local file store under `output_dir`. MLflow 3 keeps its file
    store in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE is set: it is still
    the store that needs no server and no database, so the default opts in."""
    if spec.tracking_uri:
        return spec.tracking_uri
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (Path(output_dir).resolve() / "mlruns").as_uri()


def wandb_mode() -> str:
    """Offline without WANDB_API_KEY; Ray's W&B setup asks for a key unless WANDB_MODE says so."""
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    os.environ.setdefault("WANDB_MODE", "offline")
    return os.environ["WANDB_MODE"]


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as `a/b` keys; lists and None dropped (trackers take scalars)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
    return out


class Tracker:
    """One run in the configured tracker (a no-op for `backend: none` and on ranks other than 0)."""

    def __init__(self, spec: TrackingSpec, output_dir: Path, run_name: str, params: dict[str, Any]) -> None:
        self.backend = spec.backend
        self.run: Any = None
        _check_installed(spec.backend)
        params = {k: str(v) for k, v in flatten(params).items()}
        if spec.backend == "mlflow":
            from ray.air.integrations.mlflow import setup_mlflow

            self.run = setup_mlflow(
                params, tracking_uri=mlflow_uri(spec, output_dir), experiment_name=spec.experiment,
                run_name=run_name, create_experiment_if_not_exists=True, rank_zero_only=True,
            )  # fmt: skip
        elif spec.backend == "wandb":
            from ray.air.integrations.wandb import setup_wandb

            Path(output_dir).mkdir(parents=True, exist_ok=True)
            self.run = setup_wandb(
                params, project=spec.project, name=run_name, mode=wandb_mode(), dir=str(output_dir),
                rank_zero_only=True,
            )  # fmt: skip

    def log_metrics(self, record: dict[str, Any], step: int | None = None) -> None:
        metrics = {k: float(v) for k, v in flatten(record).items() if isinstance(v, int | float)}
        if self.backend == "mlflow":
            self.run.log_metrics(metrics, step=step)
        elif self.backend == "wandb":
            self.run.log(metrics, step=step)

    def log_artifacts(self, path: Path) -> None:
        """A file or folder (logs, configs, scores: never weights) as the run's artifacts."""
        if self.backend == "mlflow" and path.is_dir():
            self.run.log_artifacts(str(path), artifact_path=path.name)
        elif self.backend == "mlflow" and path.exists():
            self.run.log_artifact(str(path))
        elif self.backend == "wandb" and path.exists():
            self.run.save(str(path / "*" if path.is_dir() else path), base_path=str(path.parent))

    def finish(self) -> None:
        if self.backend == "mlflow":
            self.run.end_run()
        elif self.backend == "wandb":
            self.run.finish()


def _check_installed(backend: str) -> None:
    import importlib.util

    if backend != "none" and importlib.util.find_spec(backend) is None:
        raise UserError(
            f"tracking.backend {backend} needs the {backend} package: pip install 'dimoe[{backend}]' "
            "(or set tracking.backend: none)"
        )


def tune_callbacks(spec: TrackingSpec, output_dir: Path) -> list[Any]:
    """Tune logger callbacks: each trial becomes a run with its config and reported results."""
    _check_installed(spec.backend)
    if spec.backend == "mlflow":
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        return [
            MLflowLoggerCallback(tracking_uri=mlflow_uri(spec, output_dir), experiment_name=spec.experiment)
        ]
    if spec.backend == "wandb":
        from ray.air.integrations.wandb import WandbLoggerCallback

        return [WandbLoggerCallback(project=spec.project, mode=wandb_mode(), dir=str(output_dir))]
    return []
