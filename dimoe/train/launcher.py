"""Launch a stage on Ray Train (TorchTrainer + DeepSpeed), or the chained curriculum.

Everything a user can get wrong (unknown blend, missing `init_from`, bad ZeRO stage — the last is
caught by the schema) is checked here, before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from dimoe.config.loader import ConfigError
from dimoe.config.train import TrainConfig
from dimoe.io import write_json

STAGE_ORDER = ("stage0_naive", "stage1_align", "stage2_full", "stage3_lownfe")
CONFIG_FILE = "train_config.json"


@dataclass(frozen=True)
class StageResult:
    stage: str
    final_dir: Path
    log_dir: Path
    checkpoint_dir: Path
    metrics: dict


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Absolute paths, since Ray workers do not share the driver's working directory."""

    def absolute(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p else p

    data = cfg.data.model_copy(update={"data_dir": absolute(cfg.data.data_dir)})
    return cfg.model_copy(
        update={
            "output_dir": absolute(cfg.output_dir),
            "model": absolute(cfg.model),
            "tokenizer": absolute(cfg.tokenizer),
            "init_from": absolute(cfg.init_from),
            "data": data,
        }
    )


def blend_dir(cfg: TrainConfig) -> Path:
    """Where the stage's blend is: Parquet files, or WebDataset shards (`data.format`)."""
    folder = "blends" if cfg.data.format == "parquet" else "webdataset"
    return Path(cfg.data.data_dir) / folder / cfg.data.blend


def validate_before_launch(cfg: TrainConfig) -> None:
    where = blend_dir(cfg).parent
    if not blend_dir(cfg).is_dir():
        known = sorted(p.name for p in where.iterdir() if p.is_dir()) if where.is_dir() else []
        command = "build-stage-blends" if cfg.data.format == "parquet" else "build-wds"
        raise ConfigError(
            f"{cfg.stage}: unknown blend {cfg.data.blend!r}: {blend_dir(cfg)} does not exist "
            f"(blends under {where}: {', '.join(known) or f'none — run `dimoe data {command}`'})"
        )
    if cfg.init_from:
        if not (Path(cfg.init_from) / "config.json").is_file():
            raise ConfigError(
                f"{cfg.stage}: init_from {cfg.init_from} is not a checkpoint directory (no config.json)"
            )
    elif cfg.requires_init:
        raise ConfigError(
            f"{cfg.stage}: this stage continues a previous one and needs `init_from` "
            "(a checkpoint directory, e.g. --set init_from=artifacts/train/stage0_naive/final)"
        )
    elif not cfg.tokenizer or not cfg.model:
        raise ConfigError(
            f"{cfg.stage}: a fresh init needs both `model` (config YAML) and `tokenizer` (directory)"
        )
    elif not Path(cfg.tokenizer).is_dir():
        raise ConfigError(f"{cfg.stage}: tokenizer directory {cfg.tokenizer} not found")
    check_objective(cfg)
    rows = blend_rows(cfg)
    workers = cfg.scaling.num_workers
    if rows // workers < cfg.batch_size:  # a worker's pass over its shard would yield no batch
        raise ConfigError(
            f"{cfg.stage}: blend {cfg.data.blend!r} has {rows} rows, {rows // workers} per worker for "
            f"{workers} workers, fewer than batch_size={cfg.batch_size}; build a larger blend "
            "(`dimoe data build-stage-blends`) or lower batch_size or scaling.num_workers"
        )


def check_objective(cfg: TrainConfig) -> None:
    """`objective: ar` trains a `causal` model, masked diffusion any other."""
    from dimoe.config.loader import load_config
    from dimoe.config.model import ModelConfig
    from dimoe.io import read_json

    if cfg.init_from:
        attention = read_json(Path(cfg.init_from) / "config.json").get("attention", "prefix")
    else:
        attention = load_config(cfg.model, ModelConfig).attention
    blocks = cfg.diffusion.block_size is not None or cfg.diffusion.block_schedule is not None
    if blocks and attention != "block":
        raise ConfigError(
            f"{cfg.stage}: diffusion.block_size / block_schedule train block diffusion, which needs a model "
            f"with attention: block (this one has {attention!r}; `dimoe model convert-ar --attention block`)"
        )
    if (cfg.objective == "ar") != (attention == "causal"):
        fix = "set the model's attention to causal" if cfg.objective == "ar" else "use objective: ar"
        raise ConfigError(
            f"{cfg.stage}: objective {cfg.objective} with a model of {attention!r} attention: the AR "
            f"objective needs the causal mask and diffusion a bidirectional one; {fix}"
        )


def blend_rows(cfg: TrainConfig) -> int:
    if cfg.data.format == "webdataset":
        from dimoe.data.wds import count_samples

        return count_samples(blend_dir(cfg))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in blend_dir(cfg).glob("*.parquet"))


TRAINING_COLUMNS = ["input_ids", "prompt_length", "image"]


def read_blend(cfg: TrainConfig) -> Any:
    """The stage's blend as a Ray Dataset of the columns training reads (input_ids, prompt_length,
    image), from Parquet or from WebDataset shards, with `origin` too where the blend has it."""
    import ray.data

    from dimoe.data.wds import training_row

    if cfg.data.format == "webdataset":
        shards = ray.data.read_webdataset(str(blend_dir(cfg)), decoder=None, file_extensions=["tar"])
        return shards.map(training_row)
    files = sorted(blend_dir(cfg).glob("*.parquet"))
    has_origin = bool(files) and "origin" in pq.read_schema(files[0]).names
    return ray.data.read_parquet(str(blend_dir(cfg)), file_extensions=["parquet"]).select_columns(
        TRAINING_COLUMNS + (["origin"] if has_origin else [])
    )


def training_datasets(cfg: TrainConfig) -> dict[str, Any]:
    """`train`, and with validation on, the held-out rows as `validation` (docs/design.md §4)."""
    from dimoe.train.validation import DATASET, split_blend

    dataset = read_blend(cfg)
    if not cfg.validation.every_steps:
        return {"train": dataset.select_columns(TRAINING_COLUMNS)}
    train, heldout = split_blend(dataset, cfg.validation.fraction, TRAINING_COLUMNS)
    heldout = heldout.limit(cfg.validation.max_rows).materialize()
    if heldout.count() == 0:
        raise ConfigError(
            f"{cfg.stage}: validation.fraction {cfg.validation.fraction} holds out no row of blend "
            f"{cfg.data.blend!r}; raise validation.fraction or build a larger blend"
        )
    return {"train": train, DATASET: heldout}


def run_stage(
    cfg: TrainConfig,
    callbacks: list | None = None,
    *,
    address: str | None = None,
    progress: bool = True,
) -> StageResult:
    """Train one stage on Ray Train; `callbacks` are Ray Train callbacks (e.g. Tune's reporter).

    Ray is joined or started through `dimoe.io.ensure_ray(address)` unless this process already
    did (`address` None: RAY_ADDRESS, else a local cluster). `progress` shows the stage's steps
    and loss on the driver (a bar on a terminal, occasional lines otherwise; see `progress.py`)."""
    from dimoe.io import ensure_ray
    from dimoe.train.progress import StageWatch

    cfg = resolve_paths(cfg)
    validate_before_launch(cfg)
    ensure_ray(address)
    stage_dir = Path(cfg.output_dir) / cfg.stage
    # The resolved config (defaults, bases and overrides applied): what produced this stage's weights.
    write_json(stage_dir / CONFIG_FILE, cfg.model_dump(mode="json"))
    trainer = _torch_trainer(cfg, stage_dir, callbacks)
    with StageWatch(stage_dir / "logs", cfg.stage, cfg.max_steps, enabled=progress) as watch:
        metrics = trainer.fit().metrics or {}
        watch.finish(metrics)
    return StageResult(cfg.stage, stage_dir / "final", stage_dir / "logs", stage_dir / "checkpoints", metrics)


def _torch_trainer(cfg: TrainConfig, stage_dir: Path, callbacks: list | None) -> Any:
    """A TorchTrainer of `train_loop_per_worker` over the stage's blend, checkpointing under
    `stage_dir/checkpoints` (a fixed run name: re-running the same command resumes, Train V2)."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dimoe.train.loop import train_loop_per_worker

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    # Ray Data's own bars follow the streaming split that feeds the workers for the whole stage: they
    # tell nothing the stage's progress does not, and leave debris in logs that are not a terminal.
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = training_datasets(cfg)
    # With validation on, the kept checkpoints are those of lowest held-out loss.
    ranked = {"checkpoint_score_attribute": "val_loss", "checkpoint_score_order": "min"}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            storage_path=str(stage_dir),
            name="checkpoints",
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.checkpoint.keep, **(ranked if cfg.validation.every_steps else {})
            ),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
        # every worker reads all held-out rows (the same scores on every rank)
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def load_curriculum(config_dir: str | Path, overrides: list[str] = ()) -> list[TrainConfig]:
    """The four stage configs of a curriculum folder (`configs/train/tiny` resolves to the packaged
    copy when the working directory has no such folder)."""
    from dimoe.config.loader import load_config, resolve_config_path

    config_dir = resolve_config_path(config_dir)
    paths = [Path(config_dir) / f"{stage}.yaml" for stage in STAGE_ORDER]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"curriculum folder {config_dir} lacks {', '.join(missing)}")
    return [load_config(p, TrainConfig, overrides) for p in paths]


def run_curriculum(
    configs: list[TrainConfig],
    *,
    stages: list[str] | None = None,
    address: str | None = None,
    progress: bool = True,
) -> list[StageResult]:
    """Train stages in order, each starting from the previous stage's final checkpoint; a stage
    whose final checkpoint already exists is skipped, so an interrupted chain continues.
    `address` and `progress` are passed to `run_stage`."""
    results = []
    previous: Path | None = None
    for cfg in configs:
        if stages and cfg.stage not in stages:
            continue
        if previous is not None:
            cfg = cfg.model_copy(update={"init_from": str(previous)})
        final = Path(cfg.output_dir).resolve() / cfg.stage / "final"
        if (final / "model.safetensors").is_file():
            print(f"{cfg.stage}: final checkpoint exists at {final}, skipped")
            results.append(
                StageResult(cfg.stage, final, final.parent / "logs", final.parent / "checkpoints", {})
            )
        else:
            results.append(run_stage(cfg, address=address, progress=progress))
        previous = results[-1].final_dir
    return results
