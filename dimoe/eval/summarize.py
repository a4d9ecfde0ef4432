"""Tables across evaluation runs: scores per task and decoding cost, per model, preset and strategy.

    paths = summarize(["artifacts/eval/s3_fast", "artifacts/eval/s3_best"], "artifacts/eval/summary")
    paths = summarize("artifacts/eval", "artifacts/eval/summary")   # every scores.json below the root

Each eval directory is one `dimoe eval run` (its scores.json names the model, preset and strategy).
Writes `summary.md` (a score table in % and a cost table) and `summary.csv` (one row per run and
task, including skipped tasks with their reason).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dimoe.errors import UserError
from dimoe.eval.runner import SCORES_FILE
from dimoe.io import read_json

# Presets in order of increasing decoding budget; other preset names follow alphabetically.
PRESET_ORDER = ("fast", "mid", "best")
MISSING = "–"
# Fields of a scores.json task entry copied into the CSV.
ENTRY_FIELDS = (
    "status",
    "score",
    "n",
    "mean_nfe",
    "nfe_x_active_params_b",
    "tokens_per_s",
    "mean_latency_s",
    "reason",
)
CSV_FIELDS = ("model", "preset", "strategy", "task", *ENTRY_FIELDS, "checkpoint", "eval_dir")


@dataclass(frozen=True)
class EvalRun:
    """One evaluation directory's scores.json."""

    eval_dir: Path
    model: str
    checkpoint: str
    preset: str
    strategy: str
    active_params_b: float | None
    tasks: dict[str, dict[str, Any]]

    @property
    def done(self) -> dict[str, dict[str, Any]]:
        return {name: entry for name, entry in self.tasks.items() if entry.get("status") == "done"}

    def sort_key(self) -> tuple:
        rank = PRESET_ORDER.index(self.preset) if self.preset in PRESET_ORDER else len(PRESET_ORDER)
        return self.model, rank, self.preset, self.strategy, str(self.eval_dir)


def find_eval_dirs(eval_dirs: Sequence[str | Path] | str | Path) -> list[Path]:
    """The eval directories meant: each given folder that is a run (holds a scores.json), or every
    run below a given folder that is their parent."""
    paths = [Path(eval_dirs)] if isinstance(eval_dirs, str | Path) else [Path(p) for p in eval_dirs]
    if not paths:
        raise UserError("no eval directories given")
    dirs: list[Path] = []
    missing = []
    for path in paths:
        runs = [path] if (path / SCORES_FILE).is_file() else sorted(p.parent for p in path.rglob(SCORES_FILE))
        dirs += runs
        if not runs:
            missing.append(str(path))
    if missing:
        raise FileNotFoundError(
            f"no {SCORES_FILE} in or below {', '.join(missing)}: give a `dimoe eval run` --out-dir "
            "or a folder that holds some (run `dimoe eval run` first)"
        )
    return dirs


def load_runs(eval_dirs: Sequence[str | Path] | str | Path) -> list[EvalRun]:
    """Every run's scores, sorted by model, preset (fast → best) and strategy."""
    runs = []
    for eval_dir in find_eval_dirs(eval_dirs):
        path = eval_dir / SCORES_FILE
        try:
            scores = read_json(path)
            runs.append(
                EvalRun(
                    eval_dir,
                    scores["model"],
                    scores["checkpoint"],
                    scores["preset"],
                    scores["strategy"],
                    scores.get("active_params_b"),
                    scores["tasks"],
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: not a scores.json written by `dimoe eval run` ({exc!r})") from None
    return sorted(runs, key=EvalRun.sort_key)


def task_names(runs: Sequence[EvalRun]) -> list[str]:
    """Tasks completed by at least one run, in the order they first appear."""
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(run.done))
    return list(names)


def average_score(run: EvalRun, tasks: Sequence[str]) -> float | None:
    """Unweighted mean score over the given tasks that the run completed (None if none)."""
    scores = [run.done[name]["score"] for name in tasks if name in run.done]
    return sum(scores) / len(scores) if scores else None


def decoding_cost(run: EvalRun) -> dict[str, float | None]:
    """The run's cost over its completed tasks, each task weighted by its number of examples:
    mean NFE, NFE × active parameters (billions), tokens/s and mean latency."""
    entries = list(run.done.values())

    def weighted(key: str) -> float | None:
        pairs = [(entry[key], entry["n"]) for entry in entries if entry.get(key) is not None]
        total = sum(n for _, n in pairs)
        return sum(value * n for value, n in pairs) / total if total else None

    mean_nfe = weighted("mean_nfe")
    active = run.active_params_b
    return {
        "mean_nfe": mean_nfe,
        "nfe_x_active_params_b": mean_nfe * active if mean_nfe is not None and active is not None else None,
        "tokens_per_s": weighted("tokens_per_s"),
        "mean_latency_s": weighted("mean_latency_s"),
    }


def percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f}"


def number(value: float | None, digits: int = 2) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table; text columns left-aligned, the rest right-aligned."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    numeric = [bool(rows) and all(_looks_numeric(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "| " + " | ".join(cell(h) for h in header) + " |",
        "|" + "|".join("---:" if is_numeric else ":---" for is_numeric in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cell(text) for text in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _looks_numeric(text: str) -> bool:
    try:
        float(text.strip("*"))  # bold cells (**61.2**) are numbers too
    except ValueError:
        return text == MISSING
    return True


def score_rows(runs: Sequence[EvalRun], tasks: Sequence[str]) -> list[list[str]]:
    return [
        [
            run.model,
            run.preset,
            run.strategy,
            *(percent(run.done[name]["score"]) if name in run.done else MISSING for name in tasks),
            percent(average_score(run, tasks)),
        ]
        for run in runs
    ]


def cost_rows(runs: Sequence[EvalRun]) -> list[list[str]]:
    rows = []
    for run in runs:
        cost = decoding_cost(run)
        rows.append(
            [
                run.model,
                run.preset,
                run.strategy,
                number(cost["mean_nfe"], 1),
                number(cost["nfe_x_active_params_b"], 3),
                number(cost["tokens_per_s"], 1),
                number(cost["mean_latency_s"], 3),
            ]
        )
    return rows


def csv_rows(runs: Sequence[EvalRun]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        for name, entry in run.tasks.items():
            rows.append(
                {
                    "model": run.model,
                    "preset": run.preset,
                    "strategy": run.strategy,
                    "task": name,
                    **{key: entry.get(key) for key in ENTRY_FIELDS},
                    "checkpoint": run.checkpoint,
                    "eval_dir": str(run.eval_dir),
                }
            )
    return rows


def summarize(eval_dirs: Sequence[str | Path] | str | Path, out_dir: str | Path) -> dict[str, Path]:
    """`dimoe eval summarize`: write summary.md and summary.csv over the runs; returns their paths."""
    runs = load_runs(eval_dirs)
    tasks = task_names(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [
        "# Evaluation summary\n",
        "## Scores (%)\n",
        "Avg is the unweighted mean over the tasks a run completed.\n",
        markdown_table(["Model", "Preset", "Strategy", *tasks, "Avg"], score_rows(runs, tasks)),
        "## Decoding cost\n",
        "Per run over its completed tasks, weighted by examples; NFE × active is in billions of "
        "parameter-forwards per request; tokens/s is per decoding actor.\n",
        markdown_table(
            ["Model", "Preset", "Strategy", "Mean NFE", "NFE × active (B)", "Tokens/s", "Latency (s)"],
            cost_rows(runs),
        ),
    ]
    skipped = [
        (run, name, entry)
        for run in runs
        for name, entry in run.tasks.items()
        if entry.get("status") == "skipped"
    ]
    if skipped:
        sections.append("## Skipped tasks\n")
        sections.append(
            "".join(
                f"- {run.model} / {run.preset} / {run.strategy}: {name} — {entry.get('reason')}\n"
                for run, name, entry in skipped
            )
        )
    markdown = out_dir / "summary.md"
    markdown.write_text("\n".join(sections), encoding="utf-8")
    table = out_dir / "summary.csv"
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(csv_rows(runs))
    return {"markdown": markdown, "csv": table}
