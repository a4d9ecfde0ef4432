"""Evaluation runs: task rows → prompts → the decoding engine on a Ray Data actor pool → scores.

    config = load_config("configs/eval/default.yaml", EvalConfig)
    scores = run_eval(config, "demo", "fast", "artifacts/train/stage3_lownfe/final", "artifacts/eval/s3_fast")

`suite` names a suite of the config (tasks whose data is missing are skipped, with the reason in
scores.json) or a single task (missing data is then an error). Every pending task's prompts go
through one Ray Data pipeline, `from_items → map_batches(EvalDecoder, ActorPoolStrategy(size=n))`,
so each actor loads the checkpoint once for the whole suite: one CPU actor on a laptop, n GPU
actors (`num_gpus=1`) on a cluster. Outputs stream back to the driver, and a task is scored and
written as soon as its last row arrives, so an interrupted run keeps its finished tasks.

Layout of `out_dir`:

    scores.json                  the run (model, checkpoint — or serve_url, the server evaluated —,
                                 preset, strategy, settings, active params)
                                 and per task: score, n, mean NFE, latency, tokens/s, NFE × active
                                 params (billions), the task's gen_length and steps, or
                                 `status: skipped` with the reason
    <task>/predictions.jsonl     per example: id, prompt, output, prediction, gold, score, nfe, latency_s
    <task>/summary.json          the task's metrics and run identity; written last, so its presence
                                 means the task is complete and a re-run reuses it

Images are read by the actors from the paths in the task rows, so on a cluster `data_root` must be
on storage every node sees.

With an `Endpoint` (`dimoe eval run --serve-url`) the same prompts go to a running server instead of
the actor pool (dimoe/eval/endpoint.py); everything else, files included, is the same.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dimoe.config.eval import EvalConfig, TaskData
from dimoe.config.infer import DecodeSettings, InferConfig
from dimoe.config.train import TrackingSpec
from dimoe.errors import UserError
from dimoe.eval.endpoint import Endpoint
from dimoe.eval.scoring import score_predictions, write_scores
from dimoe.eval.tasks import Row, Task, get_task, read_records
from dimoe.io import read_json, write_json, write_jsonl

SCORES_FILE = "scores.json"
PREDICTIONS_FILE = "predictions.jsonl"
TASK_SUMMARY_FILE = "summary.json"


class MissingTaskData(FileNotFoundError):
    """A task's data file (or one of its images) is not on disk."""


@dataclass
class PreparedTask:
    name: str
    task: Task
    data_path: Path
    rows: list[Row]
    prompts: list[dict[str, str]]  # task.build_prompt of each row: "prompt" and maybe "image"


# ---------------------------------------------------------------------------------------------- tasks


def suite_tasks(config: EvalConfig, suite: str) -> tuple[list[str], bool]:
    """The task names of `suite` and whether missing data is an error (a single task asked for)."""
    if suite in config.suites:
        return list(config.suites[suite]), False
    if suite in config.tasks:
        return [suite], True
    raise UserError(
        f"unknown suite or task {suite!r}; suites: {', '.join(config.suites) or 'none'}; "
        f"tasks: {', '.join(config.tasks) or 'none'}"
    )


def task_data_path(config: EvalConfig, name: str) -> Path:
    path = Path(config.tasks[name].path)
    return path if path.is_absolute() else Path(config.data_root) / path


def prepare_task(config: EvalConfig, name: str) -> PreparedTask:
    """Load a task's rows (first `max_samples`) and build their prompts. Raises MissingTaskData
    when the file or an image is missing; ValueError when the data is malformed."""
    task = get_task(name)
    path = task_data_path(config, name)
    hint = f"set tasks.{name}.path in the eval config or pass --set tasks.{name}.path=..."
    if not path.is_file():
        raise MissingTaskData(f"task {name}: data file not found: {path}; {hint}")
    rows = task.load(path)[: config.tasks[name].max_samples]
    if not rows:
        raise MissingTaskData(f"task {name}: {path} has no rows; {hint}")
    prompts = [task.build_prompt(row) for row in rows]
    missing = [
        prompt["image"] for prompt in prompts if "image" in prompt and not Path(prompt["image"]).is_file()
    ]
    if missing:
        raise MissingTaskData(
            f"task {name}: {len(missing)} of {len(rows)} images not found, e.g. {missing[0]} "
            "(relative image paths resolve against the data file's folder)"
        )
    return PreparedTask(name, task, path, rows, prompts)


# --------------------------------------------------------------------------------------------- decoding


class EvalDecoder:
    """Ray Data actor UDF: loads the engine once, decodes batches of prompts with each task's
    settings (`settings` by task name).

    Each output row carries its share of its task's decoding time in the batch (`decode_s`), so
    throughput can be summed per task even when a batch mixes tasks."""

    def __init__(
        self, checkpoint: str, settings: dict[str, dict[str, Any]], batch_size: int, use_gpu: bool
    ) -> None:
        from dimoe.infer.engine import GenerationEngine

        # Decided here, not on the driver: the head node may have no GPU while the workers do.
        self.engine = GenerationEngine.from_checkpoint(checkpoint, device="cuda" if use_gpu else "cpu")
        self.settings = settings
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from dimoe.infer.inputs import Request

        # Rows arrive task by task, so a batch spans at most a task boundary: decode per task.
        by_task: dict[str, list[Request]] = {}
        for key, prompt, image in zip(batch["key"], batch["prompt"], batch["image"], strict=True):
            request = Request(str(key), prompt=str(prompt), image=Path(image).read_bytes() if image else None)
            by_task.setdefault(_task_of(request.id), []).append(request)
        columns: dict[str, list[Any]] = {
            name: [] for name in ("key", "output", "output_tokens", "nfe", "latency_s", "decode_s")
        }
        for task, requests in by_task.items():
            started = time.perf_counter()
            results = self.engine.generate(requests, batch_size=self.batch_size, **self.settings[task])
            share = (time.perf_counter() - started) / len(results)
            for result in results:
                columns["key"].append(result.id)
                columns["output"].append(result.output)
                columns["output_tokens"].append(len(result.output_ids))
                columns["nfe"].append(result.nfe)
                columns["latency_s"].append(result.latency_s)
                columns["decode_s"].append(share)
        return columns


def _python(value: Any) -> Any:
    """A numpy scalar of a Ray Data batch as the plain Python value JSON can hold."""
    return value.item() if isinstance(value, np.generic) else value


def _row_key(task: str, row_id: str) -> str:
    # Task names never contain "/", so the key splits back unambiguously.
    return f"{task}/{row_id}"


def _task_of(key: str) -> str:
    return key.split("/", 1)[0]


def _decode(
    pending: list[PreparedTask],
    checkpoint: str,
    settings: dict[str, DecodeSettings],
    num_actors: int,
    batch_size: int,
    num_gpus: float,
    progress: bool,
) -> Iterator[tuple[PreparedTask, dict[str, dict]]]:
    """Decode every pending task's prompts (with `settings[task]`) on one actor pool; yield each
    task with its outputs (by row id) as soon as all of its rows are back."""
    import ray.data
    from rich.progress import Progress

    from dimoe.data.normalize import data_context
    from dimoe.io import ensure_ray

    ensure_ray()
    items = [
        {
            "key": _row_key(prepared.name, row["id"]),
            "prompt": prompt["prompt"],
            "image": prompt.get("image", ""),
        }
        for prepared in pending
        for row, prompt in zip(prepared.rows, prepared.prompts, strict=True)
    ]
    remaining = {prepared.name: len(prepared.rows) for prepared in pending}
    outputs: dict[str, dict[str, dict]] = {prepared.name: {} for prepared in pending}
    by_name = {prepared.name: prepared for prepared in pending}
    with data_context(progress), Progress(disable=not progress) as bar:
        advance = bar.add_task("evaluating", total=len(items))
        dataset = ray.data.from_items(items).map_batches(
            EvalDecoder,
            fn_constructor_kwargs={
                "checkpoint": checkpoint,
                "settings": {prepared.name: settings[prepared.name].model_dump() for prepared in pending},
                "batch_size": batch_size,
                "use_gpu": num_gpus > 0,
            },
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=num_gpus or None,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for index, key in enumerate(batch["key"]):
                name, row_id = str(key).split("/", 1)
                outputs[name][row_id] = {
                    field: _python(batch[field][index]) for field in batch if field != "key"
                }
                remaining[name] -= 1
                if remaining[name] == 0:
                    yield by_name[name], outputs.pop(name)
            bar.advance(advance, len(batch["key"]))


# ---------------------------------------------------------------------------------------------- results


def active_params_b(checkpoint: Path) -> float:
    """Active backbone parameters (billions) of a checkpoint, counted on the meta device (no weights
    are loaded, so this is cheap even for the paper-scale model)."""
    import torch

    from dimoe.model.config import DiMoEConfig
    from dimoe.model.modeling import DiMoEVLModel
    from dimoe.model.params import count_parameters

    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {checkpoint} has no config.json (expected an HF-format "
            "directory written by `dimoe model init` or `dimoe train run`)"
        )
    with torch.device("meta"):
        model = DiMoEVLModel(DiMoEConfig.from_pretrained(str(checkpoint)))
    return count_parameters(model).active_b


def model_label(checkpoint: Path) -> str:
    """A short name of a checkpoint for tables: its last two path components
    (`artifacts/train/stage3_lownfe/final` → `stage3_lownfe/final`)."""
    return "/".join(checkpoint.resolve().parts[-2:])


def _identity(
    prepared: PreparedTask, config: EvalConfig, source: dict[str, str], settings: DecodeSettings
) -> dict:
    """What makes a task's results reusable: the same model (`source`: the checkpoint, or the
    server and the model it serves), decoding settings and data."""
    return {
        **source,
        "settings": settings.model_dump(),
        "data": str(prepared.data_path.resolve()),
        "max_samples": config.tasks[prepared.name].max_samples,
    }


def _reusable(task_dir: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The stored task entry when `task_dir` holds complete results of this same run, else None.
    Results of a different run raise: mixing them into one scores.json would mislabel them."""
    summary_path = task_dir / TASK_SUMMARY_FILE
    predictions = task_dir / PREDICTIONS_FILE
    if not summary_path.is_file() or not predictions.is_file():
        return None
    stored = read_json(summary_path)
    differing = [key for key in identity if stored.get("run", {}).get(key) != identity[key]]
    if differing:
        raise UserError(
            f"{task_dir} holds results of a different run (differs in: {', '.join(differing)}); "
            "use a new --out-dir or delete that folder"
        )
    with predictions.open(encoding="utf-8") as handle:
        complete = sum(1 for line in handle if line.strip()) == stored["metrics"]["n"]
    return stored["metrics"] if complete else None


def _prediction_record(
    task: Task, row: Row, prompt: dict[str, Any], scored: dict[str, Any], decoded: dict[str, Any]
) -> dict[str, Any]:
    """One line of predictions.jsonl: the prompt, the raw output, the scored prediction, the gold
    fields, the metric's details and the decoding cost."""
    details = {key: value for key, value in scored.items() if key not in ("id", "prediction", "score")}
    return {
        "id": row["id"],
        "prompt": prompt["prompt"],
        **({"image": prompt["image"]} if "image" in prompt else {}),
        "output": decoded["output"],
        "prediction": scored["prediction"],
        "gold": {field: row[field] for field in task.gold_fields},
        "score": scored["score"],
        **details,
        "nfe": decoded["nfe"],
        "latency_s": round(decoded["latency_s"], 6),
    }


def _finish_task(
    prepared: PreparedTask,
    outputs: dict[str, dict],
    out_dir: Path,
    identity: dict[str, Any],
    settings: DecodeSettings,
    preset: str,
    active_b: float,
) -> dict[str, Any]:
    """Score a task's outputs; write its predictions, then its summary (the completion marker)."""
    task, rows = prepared.task, prepared.rows
    predictions = [{"id": row["id"], "prediction": outputs[row["id"]]["output"]} for row in rows]
    per_row, summary = score_predictions(prepared.name, predictions, rows)
    task_dir = out_dir / prepared.name
    records = (
        _prediction_record(task, row, prompt, scored, outputs[row["id"]])
        for row, prompt, scored in zip(rows, prepared.prompts, per_row, strict=True)
    )
    write_jsonl(task_dir / PREDICTIONS_FILE, records)
    decoded_rows = [outputs[row["id"]] for row in rows]
    mean_nfe = float(np.mean([row["nfe"] for row in decoded_rows]))
    decode_s = sum(row["decode_s"] for row in decoded_rows)
    metrics = {
        "status": "done",
        **{key: value for key, value in summary.items() if key not in ("task", "n_gold_without_prediction")},
        "mean_nfe": mean_nfe,
        "mean_latency_s": float(np.mean([row["latency_s"] for row in decoded_rows])),
        # Generated tokens per second of decoder time (one actor's throughput on this task).
        "tokens_per_s": sum(row["output_tokens"] for row in decoded_rows) / decode_s
        if decode_s > 0
        else None,
        "nfe_x_active_params_b": mean_nfe * active_b,
        "strategy": settings.strategy,
        "preset": preset,
        "gen_length": settings.gen_length,
        "steps": settings.steps,
        "data": str(prepared.data_path),
    }
    write_json(task_dir / TASK_SUMMARY_FILE, {"task": prepared.name, "run": identity, "metrics": metrics})
    return metrics


def _task_settings(
    infer_config: InferConfig, preset: str, task: TaskData, run_overrides: dict[str, Any]
) -> DecodeSettings:
    """A task's decoding settings: the preset, then the task's own gen_length (its answers' length;
    the preset's schedule is fitted to it), then the run's overrides, which win."""
    given = {key: value for key, value in run_overrides.items() if value is not None}
    return infer_config.resolve(preset, {"gen_length": task.gen_length, **given})


# ----------------------------------------------------------------------------------------------- public


@dataclass
class _EvalPlan:
    """Which tasks of a suite decode now, which are reused from `out_dir` and which are skipped."""

    entries: dict[str, dict[str, Any]]  # finished (reused or skipped) tasks' scores.json entries
    pending: list[PreparedTask]
    identities: dict[str, dict[str, Any]]
    settings: dict[str, DecodeSettings]
    reused: list[str]


def _plan_tasks(
    config: EvalConfig, suite: str, decoding: tuple[InferConfig, str, dict[str, Any]], source: dict[str, str],
    out_dir: Path,
) -> _EvalPlan:  # fmt: skip
    """Prepare each task of the suite; a task whose data is missing is skipped (an error in a strict
    suite), a task whose results in `out_dir` match its identity is reused."""
    infer_config, preset, run_overrides = decoding
    names, strict = suite_tasks(config, suite)
    plan = _EvalPlan({}, [], {}, {}, [])
    for name in names:
        try:
            prepared = prepare_task(config, name)
        except MissingTaskData as exc:
            if strict:
                raise
            plan.entries[name] = {"status": "skipped", "reason": str(exc)}
            continue
        plan.settings[name] = _task_settings(infer_config, preset, config.tasks[name], run_overrides)
        plan.identities[name] = _identity(prepared, config, source, plan.settings[name])
        stored = _reusable(out_dir / name, plan.identities[name])
        if stored is not None:
            plan.entries[name] = stored
            plan.reused.append(name)
        else:
            plan.pending.append(prepared)
    return plan


def _model_source(
    checkpoint: str | Path | None, endpoint: Endpoint | None
) -> tuple[dict[str, str], str, float]:
    """What is evaluated: its identity fields, its label for tables and its active parameters
    (billions), read from the checkpoint or from the server's /healthz."""
    if (checkpoint is None) == (endpoint is None):
        raise UserError("give either a checkpoint or a served model (--serve-url), not both or neither")
    if endpoint is not None:
        info = endpoint.info()
        return {"serve_url": endpoint.url, "model": info["model"]}, info["model"], info["active_params_b"]
    checkpoint = Path(checkpoint)
    active_b = active_params_b(checkpoint)
    return {"checkpoint": str(checkpoint.resolve())}, model_label(checkpoint), active_b


def run_eval(
    config: EvalConfig,
    suite: str,
    preset: str,
    checkpoint: str | Path | None,
    out_dir: str | Path,
    *,
    strategy: str | None = None,
    overrides: dict[str, Any] | None = None,
    num_actors: int = 1,
    batch_size: int = 16,
    num_gpus: float = 0.0,
    infer_config: InferConfig | None = None,
    endpoint: Endpoint | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """`dimoe eval run`: evaluate `checkpoint`, or the model served at `endpoint`, on a suite (or
    one task) with a decoding preset.

    Each task decodes with the preset fitted to its own `gen_length` (eval config), then
    strategy / overrides: decoding fields over both (None values ignored); infer_config: where
    the presets come from (default: configs/infer/default.yaml's values). A checkpoint decodes on
    num_actors Ray Data actors, each with `num_gpus` GPUs (0: CPU), in batches of `batch_size`
    prompts; an endpoint receives every settings field with each prompt (dimoe.eval.endpoint), so
    both give the same outputs. Tasks already complete in `out_dir` are reused; `progress` shows a
    progress bar over examples (for the CLI). Returns the content of scores.json plus `out_dir` and
    the task names `evaluated`, `reused` and `skipped`."""
    if num_actors < 1 or batch_size < 1:
        raise UserError(f"num_actors and batch_size must be >= 1, got {num_actors} and {batch_size}")
    infer_config = infer_config or InferConfig()
    run_overrides = {**(overrides or {}), "strategy": strategy}
    settings = infer_config.resolve(preset, run_overrides)
    source, label, active_b = _model_source(checkpoint, endpoint)
    out_dir = Path(out_dir)
    plan = _plan_tasks(config, suite, (infer_config, preset, run_overrides), source, out_dir)
    names = suite_tasks(config, suite)[0]
    run = {
        "suite": suite, **source, "model": label, "checkpoint": str(checkpoint or endpoint.url),
        "preset": preset, "strategy": settings.strategy, "settings": settings.model_dump(),
        "active_params_b": active_b,
    }  # fmt: skip

    def write_scores_file() -> dict[str, Any]:
        scores = {**run, "tasks": {name: plan.entries[name] for name in names if name in plan.entries}}
        write_json(out_dir / SCORES_FILE, scores)
        return scores

    scores = write_scores_file()
    if plan.pending:
        if endpoint is not None:
            decoded = endpoint.decode(plan.pending, plan.settings)
        else:
            decoded = _decode(
                plan.pending, str(checkpoint), plan.settings, num_actors, batch_size, num_gpus, progress
            )
        for prepared, outputs in decoded:
            name = prepared.name
            plan.entries[name] = _finish_task(
                prepared, outputs, out_dir, plan.identities[name], plan.settings[name], preset, active_b
            )
            scores = write_scores_file()
    track_scores(config.tracking, out_dir, scores)
    return {
        **scores,
        "out_dir": str(out_dir),
        "evaluated": [prepared.name for prepared in plan.pending],
        "reused": plan.reused,
        "skipped": [name for name in names if plan.entries[name]["status"] == "skipped"],
    }


def track_scores(spec: TrackingSpec, out_dir: Path, scores: dict[str, Any]) -> None:
    """The run's settings, every task's score and mean NFE, and scores.json, to MLflow / W&B."""
    if spec.backend == "none":
        return
    from dimoe.telemetry.tracking import Tracker

    params = {key: value for key, value in scores.items() if key != "tasks"}
    tracker = Tracker(spec, out_dir, f"eval-{scores['suite']}-{scores['preset']}", params)
    done = {name: task for name, task in scores["tasks"].items() if "score" in task}
    tracker.log_metrics(
        {f"{name}/{key}": task[key] for name, task in done.items() for key in ("score", "mean_nfe")}
    )
    tracker.log_artifacts(out_dir / SCORES_FILE)
    tracker.finish()


def score_file(
    task: str, pred_path: str | Path, gt_path: str | Path | None, out_dir: str | Path
) -> dict[str, Any]:
    """`dimoe eval score`: score a predictions file (JSONL/JSON rows with `id` and `prediction`, or
    `output` as written by `dimoe infer generate`) against the task's ground truth — `gt_path`, or
    gold fields carried by the rows themselves (directly or under `gold`, as `dimoe eval run` writes
    them). Writes results.jsonl and summary.json into `out_dir`; returns the summary."""
    rows = [_prediction_row(record) for record in read_records(pred_path)]
    gold = get_task(task).load(gt_path) if gt_path is not None else None
    per_row, summary = score_predictions(task, rows, gold)
    write_scores(out_dir, per_row, summary)
    return {**summary, "out_dir": str(out_dir)}


def _prediction_row(record: dict[str, Any]) -> dict[str, Any]:
    row = dict(record)
    gold = row.pop("gold", None)
    if isinstance(gold, dict):
        row.update(gold)
    if row.get("prediction") is None and row.get("output") is not None:
        row["prediction"] = row["output"]
    return row
