"""Problems E and F (docs/design.md §4) from a run's `gradient_stats.jsonl`.

    summary = diag_gradient("artifacts/train/stage2_full", "artifacts/diag/stage2_full/gradient")

Writes `summary.json`, the vision / backbone gradient-norm ratio over steps, and the spread of
per-expert gradient norms (CV and Gini over steps, per layer at the last logged step).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from dimoe.diag import plots
from dimoe.diag.logs import Record, compared, finite_or_none, read_log, run_name, series_mean, write_summary
from dimoe.diag.stats import coefficient_of_variation, gini

STREAM = "gradient_stats"
DEFINITIONS = {
    "E": "vision gradient imbalance: ||g_vision, g_projector||_2 / ||g_backbone||_2, the L2 norm of the "
    "SigLIP tower and projector gradients together over the backbone gradient norm (null when the "
    "backbone has no gradient)",
    "F": "expert gradient imbalance: per layer, the coefficient of variation (population std / mean) and "
    "the Gini coefficient of the routed experts' gradient norms; averaged over layers (layers whose "
    "experts all have zero gradient are left out)",
}


def vision_ratio(record: Record) -> float | None:
    """E of one logged step."""
    if not record["backbone"]:
        return None
    return math.hypot(record["vision"], record["projector"]) / record["backbone"]


def expert_spread(norms: list[float]) -> tuple[float | None, float | None]:
    """F of one layer: (CV, Gini) of its experts' gradient norms; None when all are zero."""
    if not any(norms):
        return None, None
    return coefficient_of_variation(norms), gini(norms)


def record_metrics(record: Record) -> dict[str, Any]:
    spreads = [expert_spread(layer) for layer in record["experts"]]
    cv = [value for value, _ in spreads]
    gini_values = [value for _, value in spreads]
    return {
        "E": vision_ratio(record),
        "F_cv": finite_or_none(series_mean(cv)),
        "F_gini": finite_or_none(series_mean(gini_values)),
        "F_cv_per_layer": cv,
        "F_gini_per_layer": gini_values,
    }


def run_metrics(log_path: str | Path) -> tuple[dict[str, Any], list[Record]]:
    """The gradient summary of one run and its records (for the plots)."""
    log, records = read_log(log_path, STREAM, ("vision", "projector", "backbone", "experts"))
    per_step = [record_metrics(record) for record in records]
    last = per_step[-1]

    def over_steps(key: str) -> list[float | None]:
        return [metrics[key] for metrics in per_step]

    summary = {
        "run": run_name(log),
        "source": str(log),
        "steps": [record["step"] for record in records],
        "headline": {
            "E_vision_grad_ratio": last["E"],
            "F_expert_grad_cv": last["F_cv"],
            "F_expert_grad_gini": last["F_gini"],
        },
        "E_vision_imbalance": {
            "definition": DEFINITIONS["E"],
            "last": last["E"],
            "mean_over_steps": series_mean(over_steps("E")),
            "over_steps": over_steps("E"),
            "vision_over_steps": [record["vision"] for record in records],
            "projector_over_steps": [record["projector"] for record in records],
            "backbone_over_steps": [record["backbone"] for record in records],
        },
        "F_expert_imbalance": {
            "definition": DEFINITIONS["F"],
            "cv": last["F_cv"],
            "gini": last["F_gini"],
            "cv_mean_over_steps": series_mean(over_steps("F_cv")),
            "gini_mean_over_steps": series_mean(over_steps("F_gini")),
            "per_layer_last": {"cv": last["F_cv_per_layer"], "gini": last["F_gini_per_layer"]},
            "over_steps": {"cv": over_steps("F_cv"), "gini": over_steps("F_gini")},
        },
    }
    return summary, records


def diag_gradient(
    log_path: str | Path, out_dir: str | Path, compare: str | Path | None = None
) -> dict[str, Any]:
    """`dimoe diag gradient`: problems E and F of one run (or two, with `compare`); writes
    `summary.json` and PNGs into `out_dir` and returns the summary."""
    out_dir = Path(out_dir)
    runs = [run_metrics(log_path)]
    if compare is not None:
        runs.append(run_metrics(compare))
    summaries = [summary for summary, _ in runs]
    result = compared(summaries[0], summaries[1] if compare is not None else None)
    result["plots"] = [
        _plot_ratio(summaries, out_dir / "vision_grad_ratio_over_steps.png"),
        _plot_expert_spread(runs, out_dir / "expert_grad_spread.png"),
    ]
    result["summary"] = str(out_dir / "summary.json")
    write_summary(out_dir, result)
    return result


def _labels(summaries: list[dict[str, Any]]) -> list[str]:
    names = [summary["run"] for summary in summaries]
    return names if len(set(names)) == len(names) else ["this", "other"][: len(names)]


def _plot_ratio(summaries: list[dict[str, Any]], path: Path) -> str:
    labels = _labels(summaries)
    figure, axes = plots.new_figure(1, 2)
    plots.plot_series(
        axes[0, 0],
        [
            (label, s["steps"], s["E_vision_imbalance"]["over_steps"])
            for label, s in zip(labels, summaries, strict=True)
        ],
        "E: (vision + projector) / backbone grad norm",
        "gradient-norm ratio",
    )
    for colour, label, summary in zip(plots.RUN_COLOURS, labels, summaries, strict=False):
        e = summary["E_vision_imbalance"]
        axes[0, 1].plot(
            summary["steps"], e["vision_over_steps"], color=colour, label=f"{label}: vision tower"
        )
        axes[0, 1].plot(
            summary["steps"],
            e["projector_over_steps"],
            color=colour,
            linestyle="--",
            label=f"{label}: projector",
        )
        axes[0, 1].plot(
            summary["steps"],
            e["backbone_over_steps"],
            color=colour,
            linestyle=":",
            label=f"{label}: backbone",
        )
    axes[0, 1].set_yscale("symlog", linthresh=1e-4)
    axes[0, 1].set_title("gradient norms by component")
    axes[0, 1].set_xlabel("step")
    axes[0, 1].grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7)
    return plots.save(figure, path)


def _plot_expert_spread(runs: list[tuple[dict[str, Any], list[Record]]], path: Path) -> str:
    summaries = [summary for summary, _ in runs]
    labels = _labels(summaries)
    figure, axes = plots.new_figure(1 + len(runs), 2)
    plots.plot_series(
        axes[0, 0],
        [
            (label, s["steps"], s["F_expert_imbalance"]["over_steps"]["cv"])
            for label, s in zip(labels, summaries, strict=True)
        ],
        "F: CV of per-expert grad norms (mean over layers)",
        "coefficient of variation",
    )
    plots.plot_series(
        axes[0, 1],
        [
            (label, s["steps"], s["F_expert_imbalance"]["over_steps"]["gini"])
            for label, s in zip(labels, summaries, strict=True)
        ],
        "F: Gini of per-expert grad norms (mean over layers)",
        "Gini coefficient",
    )
    for row, ((summary, records), label) in enumerate(zip(runs, labels, strict=True), start=1):
        norms = np.asarray(records[-1]["experts"], dtype=float)
        # Each layer divided by its mean, so layers of different scale share one colour range.
        means = norms.mean(axis=1, keepdims=True)
        relative = np.divide(norms, means, out=np.zeros_like(norms), where=means > 0)
        plots.heatmap(
            figure,
            axes[row, 0],
            relative,
            f"{label}: expert grad norm / layer mean (step {summary['steps'][-1]})",
            "expert",
            "layer",
        )
        per_layer = summary["F_expert_imbalance"]["per_layer_last"]["cv"]
        axes[row, 1].bar(
            np.arange(len(per_layer)), [value or 0.0 for value in per_layer], color=plots.RUN_COLOURS[row - 1]
        )
        axes[row, 1].set_xticks(np.arange(len(per_layer)))
        axes[row, 1].set_title(f"{label}: CV per layer (step {summary['steps'][-1]})")
        axes[row, 1].set_xlabel("layer")
        axes[row, 1].set_ylabel("coefficient of variation")
        axes[row, 1].grid(alpha=0.3, axis="y")
    return plots.save(figure, path)
