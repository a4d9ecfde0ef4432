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
from matplotlib.figure import Figure

from dimoe.diag import plots
from dimoe.diag.driver import LogDiagnostic, Run, Summary, diagnose, over_steps, step_series, tracked
from dimoe.diag.logs import Record
from dimoe.diag.stats import coefficient_of_variation, gini, series_mean

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
    """E and F of one logged step (F per layer and averaged over layers)."""
    spreads = [expert_spread(layer) for layer in record["experts"]]
    cv = [value for value, _ in spreads]
    gini_values = [value for _, value in spreads]
    return {
        "E": vision_ratio(record),
        "F_cv": series_mean(cv),
        "F_gini": series_mean(gini_values),
        "F_cv_per_layer": cv,
        "F_gini_per_layer": gini_values,
    }


def _summarise(records: list[Record]) -> Summary:
    """E and F of one run: headline values of the last logged step, and every metric over steps."""
    per_step = [record_metrics(record) for record in records]
    last = per_step[-1]
    cv, gini_values = over_steps(per_step, "F_cv"), over_steps(per_step, "F_gini")
    return {
        "headline": {
            "E_vision_grad_ratio": last["E"],
            "F_expert_grad_cv": last["F_cv"],
            "F_expert_grad_gini": last["F_gini"],
        },
        "E_vision_imbalance": {
            **tracked(DEFINITIONS["E"], over_steps(per_step, "E")),
            **{
                f"{part}_over_steps": over_steps(records, part)
                for part in ("vision", "projector", "backbone")
            },
        },
        "F_expert_imbalance": {
            "definition": DEFINITIONS["F"],
            "cv": last["F_cv"],
            "gini": last["F_gini"],
            "cv_mean_over_steps": series_mean(cv),
            "gini_mean_over_steps": series_mean(gini_values),
            "per_layer_last": {"cv": last["F_cv_per_layer"], "gini": last["F_gini_per_layer"]},
            "over_steps": {"cv": cv, "gini": gini_values},
        },
    }


GRADIENT = LogDiagnostic("gradient_stats", ("vision", "projector", "backbone", "experts"), _summarise)


def run_metrics(log_path: str | Path) -> tuple[Summary, list[Record]]:
    """The gradient summary of one run and its records (for the plots)."""
    return GRADIENT.summary(log_path)


def diag_gradient(
    log_path: str | Path, out_dir: str | Path, compare: str | Path | None = None
) -> dict[str, Any]:
    """`dimoe diag gradient`: problems E and F of one run (or two, with `compare`); writes
    `summary.json` and PNGs into `out_dir` and returns the summary."""
    return diagnose(GRADIENT, log_path, out_dir, compare, _figures)


def _figures(runs: list[Run]) -> dict[str, Figure]:
    return {
        "vision_grad_ratio_over_steps.png": _plot_ratio(runs),
        "expert_grad_spread.png": _plot_expert_spread(runs),
    }


# Line style per gradient component in the norms panel (colour tells the runs apart).
COMPONENT_STYLES = (
    ("vision", "-", "vision tower"),
    ("projector", "--", "projector"),
    ("backbone", ":", "backbone"),
)


def _plot_ratio(runs: list[Run]) -> Figure:
    """E over steps, and the three norms it is made of."""
    figure, axes = plots.new_figure(1, 2)
    plots.plot_series(
        axes[0, 0],
        step_series(runs, "E_vision_imbalance", "over_steps"),
        "E: (vision + projector) / backbone grad norm",
        "gradient-norm ratio",
    )
    norms = axes[0, 1]
    for colour, run in zip(plots.RUN_COLOURS, runs, strict=False):
        e, steps = run.summary["E_vision_imbalance"], run.summary["steps"]
        for part, style, name in COMPONENT_STYLES:
            label = f"{run.label}: {name}"
            norms.plot(steps, e[f"{part}_over_steps"], color=colour, linestyle=style, label=label)
    # symlog: a frozen tower's zero norm stays on the plot next to norms of order 1.
    norms.set_yscale("symlog", linthresh=1e-4)
    norms.set_title("gradient norms by component")
    norms.set_xlabel("step")
    norms.grid(alpha=0.3)
    norms.legend(fontsize=7)
    return figure


def _plot_expert_spread(runs: list[Run]) -> Figure:
    """F over steps (CV and Gini), then per run the last step's per-expert norms and CV per layer."""
    figure, axes = plots.new_figure(1 + len(runs), 2)
    plots.plot_series(
        axes[0, 0],
        step_series(runs, "F_expert_imbalance", "over_steps", "cv"),
        "F: CV of per-expert grad norms (mean over layers)",
        "coefficient of variation",
    )
    plots.plot_series(
        axes[0, 1],
        step_series(runs, "F_expert_imbalance", "over_steps", "gini"),
        "F: Gini of per-expert grad norms (mean over layers)",
        "Gini coefficient",
    )
    for row, (run, colour) in enumerate(zip(runs, plots.RUN_COLOURS, strict=False), start=1):
        step = run.summary["steps"][-1]
        norms = np.asarray(run.records[-1]["experts"], dtype=float)
        # Each layer divided by its mean, so layers of different scale share one colour range.
        means = norms.mean(axis=1, keepdims=True)
        relative = np.divide(norms, means, out=np.zeros_like(norms), where=means > 0)
        title = f"{run.label}: expert grad norm / layer mean (step {step})"
        plots.heatmap(figure, axes[row, 0], relative, title, "expert", "layer")
        per_layer = run.summary["F_expert_imbalance"]["per_layer_last"]["cv"]
        ax = axes[row, 1]
        ax.bar(np.arange(len(per_layer)), [value or 0.0 for value in per_layer], color=colour)
        ax.set_xticks(np.arange(len(per_layer)))
        ax.set_title(f"{run.label}: CV per layer (step {step})")
        ax.set_xlabel("layer")
        ax.set_ylabel("coefficient of variation")
        ax.grid(alpha=0.3, axis="y")
    return figure
