"""The one driver of the diagnostics that read training logs (docs/telemetry.md).

A diagnostic is a `LogDiagnostic`: the log stream it reads, the fields every record needs, and its
computation on one run's records. The driver finds and reads the log (a file, its `logs/` folder or
the stage folder), runs the computation for the run and, with `compare`, for a second run shown side
by side (`this` / `other`), then writes `summary.json` and the diagnostic's PNGs:

    ROUTING = LogDiagnostic("routing_stats", ("expert_load", ...), summarise_routing)
    diagnose(ROUTING, log, out_dir, compare, routing_figures)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from dimoe.diag import plots
from dimoe.diag.logs import Record, read_log, run_name
from dimoe.diag.stats import series_mean
from dimoe.io import write_json

Summary = dict[str, Any]


@dataclass(frozen=True)
class Run:
    """One run of a diagnostic: its summary and its records sorted by step (for the plots)."""

    role: str  # "this" (the run diagnosed) or "other" (the one it is compared with)
    label: str  # legend entry: the run's name, or its role when both runs share a name
    summary: Summary
    records: list[Record]


@dataclass(frozen=True)
class LogDiagnostic:
    stream: str  # the log read, e.g. "routing_stats" for routing_stats.jsonl
    required: tuple[str, ...]  # fields every record needs besides `step`
    summarise: Callable[[list[Record]], Summary]  # records sorted by step -> the run's metrics

    def summary(self, path: str | Path) -> tuple[Summary, list[Record]]:
        """One run's summary (its name, log, steps and metrics) and its records sorted by step."""
        log, records = read_log(path, self.stream, self.required)
        summary = {"run": run_name(log), "source": str(log), "steps": [record["step"] for record in records]}
        return {**summary, **self.summarise(records)}, records

    def runs(self, this: str | Path | None, other: str | Path | None) -> list[Run]:
        """The runs whose logs are given (either may be None), with distinct legend labels."""
        given = [(role, path) for role, path in (("this", this), ("other", other)) if path is not None]
        loaded = [self.summary(path) for _, path in given]
        names = [summary["run"] for summary, _ in loaded]
        # Two runs of the same stage name (different output dirs) still need distinct legend entries.
        labels = names if len(set(names)) == len(names) else [role for role, _ in given]
        return [
            Run(role, label, summary, records)
            for (role, _), label, (summary, records) in zip(given, labels, loaded, strict=True)
        ]


def side_by_side(runs: list[Run]) -> Summary | None:
    """One run's summary as it is, or both under `this` / `other` when a run is compared (`this`
    is null when only the compared run was given)."""
    summaries = {run.role: run.summary for run in runs}
    if "other" not in summaries:
        return summaries.get("this")
    return {"this": summaries.get("this"), "other": summaries["other"]}


def over_steps(per_step: list[dict[str, Any]], key: str) -> list[Any]:
    """One metric of every logged step."""
    return [metrics[key] for metrics in per_step]


def tracked(definition: str, values: list[float | None]) -> Summary:
    """A metric reported over training: its definition, value at the last step, mean and series."""
    return {
        "definition": definition,
        "last": values[-1],
        "mean_over_steps": series_mean(values),
        "over_steps": values,
    }


def step_series(runs: list[Run], *keys: str) -> list[tuple[str, list[int], list[float | None]]]:
    """(label, steps, values) per run for `plots.plot_series`; `keys` lead to the values in a summary."""
    series = []
    for run in runs:
        values: Any = run.summary
        for key in keys:
            values = values[key]
        series.append((run.label, run.summary["steps"], values))
    return series


def write_outputs(out_dir: str | Path, result: Summary, figures: dict[str, Figure]) -> Summary:
    """Save `figures` (file name -> figure) as PNGs and `result`, with the paths it wrote, as
    `summary.json` in `out_dir`; returns `result`."""
    out_dir = Path(out_dir)
    result["plots"] = [plots.save(figure, out_dir / name) for name, figure in figures.items()]
    result["summary"] = str(out_dir / "summary.json")
    write_json(out_dir / "summary.json", result)
    return result


def diagnose(
    diagnostic: LogDiagnostic,
    log: str | Path,
    out_dir: str | Path,
    compare: str | Path | None,
    figures: Callable[[list[Run]], dict[str, Figure]],
) -> Summary:
    """`dimoe diag <name>` for a log diagnostic: the run at `log` (and the one at `compare`, side by
    side), `summary.json` and the PNGs `figures` draws for the runs, in `out_dir`."""
    runs = diagnostic.runs(log, compare)
    return write_outputs(out_dir, side_by_side(runs), figures(runs))
