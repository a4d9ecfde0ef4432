"""The ablation grid on Ray Tune: one trial per (variant, seed) trains the variant (a TorchTrainer
inside a Tune function trainable), evaluates it at the `best` and `fast` presets and computes the
A–F diagnostics from its own logs; the grid ends in `results.csv` / `results.md`, which
`dimoe tools export-paper-tables --tune-results` turns into the ablation table.

Layout under `<storage_path>/<name>/`: Tune's experiment state (so a re-run resumes the grid),
`trials/<variant>-s<seed>/{train,eval}/` (stable per trial, so a retried or resumed trial continues
from its own checkpoints and finished evaluations), `grid.json` (the resolved grid), and the
results table.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from dimoe.config.eval import EvalConfig
from dimoe.config.loader import ConfigError, load_config
from dimoe.config.train import TrainConfig
from dimoe.config.tune import TuneConfig
from dimoe.io import iter_jsonl, read_json, write_json

RESULT_COLUMNS = (
    "variant", "seed", "status", "accuracy_best", "accuracy_fast", "describe_f1_best", "describe_f1_fast",
    "heldout_loss", "nfe_best", "nfe_fast",
    "A_routing_js", "B_topk_jaccard", "C_nmi_modality", "C_nmi_t_bucket", "D_zero_supervision",
    "E_vision_grad_ratio", "F_expert_grad_cv", "train_steps", "error",
)  # fmt: skip


def trial_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def experiment_dir(cfg: TuneConfig) -> Path:
    return Path(cfg.storage_path).resolve() / cfg.name


def trial_stage_configs(cfg: TuneConfig, variant: str, seed: int, trial_dir: Path) -> list[TrainConfig]:
    """The stage(s) a trial trains: the base stage with the variant's overrides, then its
    follow-up stage if any. ConfigError (naming the variant) for a bad override."""
    spec = cfg.variants[variant]
    paths = [f"output_dir={trial_dir / 'train'}", f"seed={seed}"]
    try:
        stages = [load_config(cfg.base_stage, TrainConfig, [*cfg.base_set, *spec.set, *paths])]
        if spec.then:
            stages.append(load_config(spec.then, TrainConfig, [*cfg.base_set, *spec.then_set, *paths]))
    except ConfigError as exc:
        raise ConfigError(f"variant {variant!r}: {exc}") from None
    return stages


def validate_grid(cfg: TuneConfig, variants: list[str]) -> None:
    """Resolve every trial's configs before any trial starts, so a typo fails the grid at once."""
    for variant in variants:
        trial_stage_configs(cfg, variant, cfg.seeds[0], experiment_dir(cfg) / "trials" / "check")
    load_config(cfg.eval.config, EvalConfig, cfg.eval.set)


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: train → evaluate (best, fast) → diagnose; returns the row."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dimoe.train.launcher import run_stage

    cfg = TuneConfig.model_validate(config["grid"])
    variant, seed = config["variant"], config["seed"]
    trial_dir = experiment_dir(cfg) / "trials" / trial_name(variant, seed)
    stages = trial_stage_configs(cfg, variant, seed, trial_dir)
    previous: Path | None = None
    steps = 0
    for stage in stages:
        if previous is not None:
            stage = stage.model_copy(update={"init_from": str(previous)})
        final = Path(stage.output_dir) / stage.stage / "final"
        if not (final / "model.safetensors").is_file():  # a resumed trial skips finished stages
            run_stage(stage, callbacks=[TuneReportCallback()])
        previous, steps = final, steps + stage.max_steps
    # Diagnostics and the held-out loss come from the stage the variant is about (the base stage,
    # whose held-out rows every variant shares), evaluation from the weights the variant ends with.
    base_stage_dir = Path(stages[0].output_dir) / stages[0].stage
    row = {
        "variant": variant,
        "seed": seed,
        "status": "ok",
        "train_steps": steps,
        **evaluate_trial(cfg, previous, trial_dir / "eval"),
        **final_heldout_loss(base_stage_dir / "logs"),
        **diagnose_trial(base_stage_dir / "logs"),
    }
    write_json(trial_dir / "result.json", row)
    tune.report(row)


DESCRIBE_TASK = "demo_describe"  # scored by token F1: reported apart from the VQA accuracy


def evaluate_trial(cfg: TuneConfig, checkpoint: Path, out_dir: Path) -> dict[str, float]:
    """Per preset: the mean exact match of the VQA tasks (`accuracy_*`), the description task's
    token F1 (`describe_f1_*`), the mean NFE, and every task's own score."""
    from dimoe.eval.runner import run_eval

    eval_cfg = load_config(cfg.eval.config, EvalConfig, cfg.eval.set)
    suite = cfg.eval.suite
    if cfg.eval.tasks:
        eval_cfg = eval_cfg.model_copy(update={"suites": {**eval_cfg.suites, "tune": list(cfg.eval.tasks)}})
        suite = "tune"
    out: dict[str, float] = {}
    for preset in cfg.eval.presets:
        result = run_eval(
            eval_cfg, suite, preset, checkpoint, out_dir / preset,
            overrides=cfg.eval.decode, batch_size=cfg.eval.batch_size,
        )  # fmt: skip
        scored = {name: task for name, task in result["tasks"].items() if "score" in task}
        vqa = [task for name, task in scored.items() if name != DESCRIBE_TASK]
        if not vqa:
            raise RuntimeError(
                f"no VQA task of suite {suite!r} was evaluated (missing data?): {result['tasks']}"
            )
        out[f"accuracy_{preset}"] = sum(task["score"] for task in vqa) / len(vqa)
        if DESCRIBE_TASK in scored:
            out[f"describe_f1_{preset}"] = scored[DESCRIBE_TASK]["score"]
        out[f"nfe_{preset}"] = sum(task["mean_nfe"] for task in scored.values()) / len(scored)
        for name, task in result["tasks"].items():
            if "score" in task:
                out[f"{preset}/{name}"] = task["score"]
    return out


def final_heldout_loss(log_dir: Path) -> dict[str, float]:
    """`heldout_loss`: the last `val_loss` the stage logged (`train.validation`: the diffusion loss
    of held-out rows at a fixed t grid and fixed masks, comparable across variants); nothing when
    the stage ran without validation."""
    losses = [row["val_loss"] for _, row in iter_jsonl(log_dir / "train_metrics.jsonl") if "val_loss" in row]
    return {"heldout_loss": losses[-1]} if losses else {}


def diagnose_trial(log_dir: Path) -> dict[str, float | None]:
    """The headline A–F metrics of a training run's logs (as `dimoe diag` computes them)."""
    from dimoe.diag.gradient import run_metrics as gradient_metrics
    from dimoe.diag.routing import run_metrics as routing_metrics
    from dimoe.diag.supervision import observed_zero_supervision

    routing, _ = routing_metrics(log_dir)
    gradient, _ = gradient_metrics(log_dir)
    return {
        **routing["headline"],
        "D_zero_supervision": observed_zero_supervision(log_dir)["fraction"],
        "E_vision_grad_ratio": gradient["headline"]["E_vision_grad_ratio"],
        "F_expert_grad_cv": gradient["headline"]["F_expert_grad_cv"],
    }


def local_cluster_cpus(cfg: TuneConfig) -> int:
    """Logical CPUs a local cluster needs to run `max_concurrent_trials` at once: each trial's
    training workers, plus one CPU per trial for the Ray Data tasks that stream its blend and for
    its evaluation actor. Declaring fewer deadlocks (workers hold every CPU, data never comes)."""
    stage = load_config(cfg.base_stage, TrainConfig, list(cfg.base_set))
    per_trial = stage.scaling.num_workers * stage.scaling.cpus_per_worker + 1
    return max(os.cpu_count() or 1, math.ceil(per_trial * cfg.max_concurrent_trials))


def run_grid(cfg: TuneConfig, variants: list[str] | None = None, *, restart: bool = False) -> dict[str, Any]:
    """Run (or resume) the grid; a failed trial becomes a row with status `error`, not a crash.
    Returns the rows and the paths of the results table."""
    import ray
    from ray import tune

    from dimoe.telemetry.tracking import tune_callbacks

    names = cfg.selected(variants or cfg.run)
    validate_grid(cfg, names)
    root = experiment_dir(cfg)
    grid = {"variants": names, "seeds": cfg.seeds, "config": cfg.model_dump(mode="json")}
    _check_same_grid(root, grid, restart)
    if not ray.is_initialized():
        ray.init(num_cpus=local_cluster_cpus(cfg))
    # Trials keep the job's working directory (Tune would move them into their trial folder), so
    # config paths mean the same in a trial as on the command line; Tune propagates this variable.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    trainable = tune.with_resources(run_trial, {"CPU": 0.01})  # the trial driver itself only waits
    path = str(root)
    if not restart and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        space = {
            "grid": cfg.model_dump(mode="json"),
            "variant": tune.grid_search(names),
            "seed": tune.grid_search(cfg.seeds),
        }
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials),
            run_config=tune.RunConfig(
                name=cfg.name,
                storage_path=str(root.parent),
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                callbacks=tune_callbacks(cfg.tracking, root) or None,
            ),
        )
    results = tuner.fit()
    rows = [_row(result) for result in results]
    rows.sort(key=lambda r: (names.index(r["variant"]) if r["variant"] in names else len(names), r["seed"]))
    return {"rows": rows, **write_results(rows, root)}


def _check_same_grid(root: Path, grid: dict[str, Any], restart: bool) -> None:
    """Resuming a grid whose definition changed would mix results of two grids: refuse it."""
    stored = root / "grid.json"
    if stored.is_file() and not restart and read_json(stored) != grid:
        raise ConfigError(
            f"{root} holds a grid with a different definition; re-run with --restart to start it over, "
            "or give the new grid its own `name`"
        )
    write_json(stored, grid)


def _row(result: Any) -> dict[str, Any]:
    config = result.config or {}
    row: dict[str, Any] = {"variant": config.get("variant"), "seed": config.get("seed")}
    if result.error is not None:
        message = str(result.error).strip().splitlines()
        return {**row, "status": "error", "error": (message[-1] if message else type(result.error).__name__)}
    return {**row, **{k: v for k, v in (result.metrics or {}).items() if k in RESULT_COLUMNS}}


def write_results(rows: list[dict[str, Any]], root: Path) -> dict[str, str]:
    csv_path, md_path = root / "results.csv", root / "results.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    header = [c for c in RESULT_COLUMNS if c != "error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in header) + " |" for row in rows]
    errors = [f"- {row['variant']} (seed {row['seed']}): {row['error']}" for row in rows if row.get("error")]
    if errors:
        lines += ["", "Failed trials:", *errors]
    lines += ["", "Mean ± std over seeds:", "", *seed_summary(rows)]
    md_path.write_text("\n".join(lines) + "\n")
    return {"csv": str(csv_path), "markdown": str(md_path)}


SUMMARY_COLUMNS = ("accuracy_best", "accuracy_fast", "describe_f1_best", "heldout_loss", "D_zero_supervision",
                   "A_routing_js", "B_topk_jaccard", "E_vision_grad_ratio", "F_expert_grad_cv")  # fmt: skip


def seed_summary(rows: list[dict[str, Any]]) -> list[str]:
    """A Markdown table: per variant, the seeds that finished and mean ± std (sample std, n - 1) of
    the headline columns over them."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("status") == "ok":
            by_variant.setdefault(row["variant"], []).append(row)
    lines = [
        "| variant | seeds | " + " | ".join(SUMMARY_COLUMNS) + " |",
        "|" + "---|" * (len(SUMMARY_COLUMNS) + 2),
    ]
    for variant, group in by_variant.items():
        cells = [mean_std([row.get(column) for row in group]) for column in SUMMARY_COLUMNS]
        lines.append(f"| {variant} | {len(group)} | " + " | ".join(cells) + " |")
    return lines


def mean_std(values: list[Any]) -> str:
    """`mean ± std` of the finite values (`mean` alone for one value, `–` for none)."""
    finite = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not finite:
        return "–"
    mean = sum(finite) / len(finite)
    if len(finite) == 1:
        return f"{mean:.3f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
    return f"{mean:.3f} ± {std:.3f}"


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
