"""Problems A, B and C (docs/design.md §4) from a run's `routing_stats.jsonl`.

    summary = diag_routing("artifacts/train/stage2_full", "artifacts/diag/stage2_full/routing",
                           compare="artifacts/train/stage0_naive")

Writes `summary.json` and three PNGs: expert load per t-bucket at the last logged step (one heat-map
per layer), A and B over training steps, and the specialisation bars of C per layer. Headline
values are those of the last logged step; every metric is also reported over steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dimoe.diag import plots
from dimoe.diag.driver import LogDiagnostic, Run, Summary, diagnose, over_steps, step_series, tracked
from dimoe.diag.logs import Record
from dimoe.diag.stats import js_divergence, normalized_mutual_information, series_mean

MODALITIES = ("image", "prompt", "response")
DEFINITIONS = {
    "A": "routing non-stationarity: per layer, the mean over non-empty t-buckets of the Jensen-Shannon "
    "divergence (bits) between the bucket's expert-load distribution and the token-weighted mean "
    "over all buckets; averaged over layers",
    "B": "routing inconsistency: mean over layers of the mean Jaccard overlap of a visible token's "
    "top-k expert sets in the two views (1 = always the same experts; null for one-view runs)",
    "C": "specialisation: per layer, the normalised mutual information 2 I / (H_X + H_Y) between the "
    "expert chosen (top-k choices of visible tokens) and the token's modality (image / prompt / "
    "response), versus between the expert chosen and the t-bucket; averaged over layers",
}


def layer_nonstationarity(load: np.ndarray, tokens: np.ndarray) -> float | None:
    """A for one layer: `load[bucket, expert]` fractions, `tokens[bucket]` visible-token counts.
    Empty buckets (no tokens) have zero load rows and are left out; None when all are empty."""
    present = (tokens > 0) & (load.sum(axis=1) > 0)
    if not present.any():
        return None
    mean = (load[present] * tokens[present, None]).sum(axis=0) / tokens[present].sum()
    return float(np.mean([js_divergence(row, mean) for row in load[present]]))


def layer_specialisation(
    load: np.ndarray, tokens: np.ndarray, usage: dict[str, list[int]]
) -> tuple[float | None, float | None]:
    """C for one layer: (NMI of expert with modality, NMI of expert with t-bucket).

    The expert × t-bucket table is `load[bucket, expert] × tokens[bucket]`: the load is a fraction
    of top-k assignments, so this is the assignment count up to the constant factor k, which NMI
    does not see."""
    by_modality = np.array([usage.get(name, []) or [0] * load.shape[1] for name in MODALITIES], dtype=float)
    by_bucket = load * tokens[:, None]
    nmi_modality = normalized_mutual_information(by_modality) if by_modality.sum() > 0 else None
    nmi_bucket = normalized_mutual_information(by_bucket) if by_bucket.sum() > 0 else None
    return nmi_modality, nmi_bucket


def record_metrics(record: Record) -> dict[str, Any]:
    """A, B and C of one logged step, per layer and averaged over layers."""
    loads = [np.asarray(layer, dtype=float) for layer in record["expert_load"]]
    tokens = np.asarray(record["bucket_tokens"], dtype=float)
    a_layers = [layer_nonstationarity(load, tokens) for load in loads]
    overlap = record.get("topk_overlap")
    b_layers = [float(value) for value in overlap] if overlap is not None else None
    c_layers = [
        layer_specialisation(load, tokens, usage)
        for load, usage in zip(loads, record["modality_usage"], strict=True)
    ]
    return {
        "A": series_mean(a_layers),
        "A_per_layer": a_layers,
        "B": series_mean(b_layers) if b_layers is not None else None,
        "B_per_layer": b_layers,
        "C_modality": series_mean([modality for modality, _ in c_layers]),
        "C_t_bucket": series_mean([bucket for _, bucket in c_layers]),
        "C_modality_per_layer": [modality for modality, _ in c_layers],
        "C_t_bucket_per_layer": [bucket for _, bucket in c_layers],
    }


def _summarise(records: list[Record]) -> Summary:
    """A, B and C of one run: headline values of the last logged step, and every metric over steps."""
    per_step = [record_metrics(record) for record in records]
    last, last_record = per_step[-1], records[-1]
    return {
        "num_layers": len(last_record["expert_load"]),
        "num_buckets": len(last_record["bucket_tokens"]),
        "num_experts": len(last_record["expert_load"][0][0]),
        "headline": {
            "A_routing_js": last["A"],
            "B_topk_jaccard": last["B"],
            "C_nmi_modality": last["C_modality"],
            "C_nmi_t_bucket": last["C_t_bucket"],
        },
        "A_nonstationarity": {
            **tracked(DEFINITIONS["A"], over_steps(per_step, "A")),
            "per_layer_last": last["A_per_layer"],
        },
        "B_inconsistency": {
            **tracked(DEFINITIONS["B"], over_steps(per_step, "B")),
            "per_layer_last": last["B_per_layer"],
        },
        "C_specialisation": {
            "definition": DEFINITIONS["C"],
            "nmi_modality": last["C_modality"],
            "nmi_t_bucket": last["C_t_bucket"],
            "per_layer_last": {
                "nmi_modality": last["C_modality_per_layer"],
                "nmi_t_bucket": last["C_t_bucket_per_layer"],
            },
            "over_steps": {
                "nmi_modality": over_steps(per_step, "C_modality"),
                "nmi_t_bucket": over_steps(per_step, "C_t_bucket"),
            },
        },
    }


ROUTING = LogDiagnostic("routing_stats", ("expert_load", "bucket_tokens", "modality_usage"), _summarise)


def run_metrics(log_path: str | Path) -> tuple[Summary, list[Record]]:
    """The routing summary of one run and its records (for the plots)."""
    return ROUTING.summary(log_path)


def diag_routing(
    log_path: str | Path, out_dir: str | Path, compare: str | Path | None = None
) -> dict[str, Any]:
    """`dimoe diag routing`: problems A, B and C of one run (or two, with `compare`); writes
    `summary.json` and PNGs into `out_dir` and returns the summary."""
    return diagnose(ROUTING, log_path, out_dir, compare, _figures)


def _figures(runs: list[Run]) -> dict[str, Figure]:
    return {
        "expert_load_by_t_bucket.png": _plot_load_heatmaps(runs),
        "routing_over_steps.png": _plot_over_steps(runs),
        "specialisation.png": _plot_specialisation(runs),
    }


def _plot_load_heatmaps(runs: list[Run]) -> Figure:
    """Expert load per t-bucket at the last logged step: one heat-map per layer, a block per run."""
    layers = max(run.summary["num_layers"] for run in runs)
    rows_per_run, cols = plots.grid_shape(layers)
    figure, axes = plots.new_figure(rows_per_run * len(runs), cols, width=3.6, height=2.6)
    # One colour scale for every panel, so runs and layers compare at a glance.
    vmax = max(float(np.max(run.records[-1]["expert_load"])) for run in runs) or 1.0
    for index, run in enumerate(runs):
        block = axes[index * rows_per_run : (index + 1) * rows_per_run]
        last = run.records[-1]["expert_load"]
        for layer, load in enumerate(last):
            plots.heatmap(
                figure,
                block.flat[layer],
                np.asarray(load, dtype=float),
                f"{run.label} · layer {layer} (step {run.summary['steps'][-1]})",
                "expert",
                "t-bucket",
                vmax,
            )
        plots.hide_unused(block, len(last))
    figure.suptitle("Expert load per t-bucket (fraction of top-k assignments of visible tokens)")
    return figure


def _plot_over_steps(runs: list[Run]) -> Figure:
    figure, axes = plots.new_figure(1, 2)
    plots.plot_series(
        axes[0, 0],
        step_series(runs, "A_nonstationarity", "over_steps"),
        "A: routing non-stationarity",
        "mean JS divergence (bits)",
    )
    plots.plot_series(
        axes[0, 1],
        step_series(runs, "B_inconsistency", "over_steps"),
        "B: top-k consistency between views",
        "mean Jaccard overlap",
    )
    if all(run.summary["B_inconsistency"]["last"] is None for run in runs):
        axes[0, 1].text(
            0.5, 0.5, "single-view run: no view overlap logged", ha="center", transform=axes[0, 1].transAxes
        )
    return figure


def _plot_specialisation(runs: list[Run]) -> Figure:
    """C per layer at the last logged step: NMI with modality (solid) and t-bucket (hatched) bars."""
    layers = max(run.summary["num_layers"] for run in runs)
    figure, axes = plots.new_figure(1, 1, width=max(7.0, 1.2 * layers + 2))  # room for the title
    ax = axes[0, 0]
    width = 0.8 / (2 * len(runs))
    for index, (run, colour) in enumerate(zip(runs, plots.RUN_COLOURS, strict=False)):
        per_layer = run.summary["C_specialisation"]["per_layer_last"]
        positions = np.arange(len(per_layer["nmi_modality"]))
        for kind, (key, hatch) in enumerate((("nmi_modality", ""), ("nmi_t_bucket", "//"))):
            values = [value if value is not None else 0.0 for value in per_layer[key]]
            offset = (2 * index + kind - len(runs) + 0.5) * width
            ax.bar(
                positions + offset,
                values,
                width,
                color=colour,
                hatch=hatch,
                edgecolor="black",
                linewidth=0.5,
                alpha=1.0 if kind == 0 else 0.55,
                label=f"{run.label}: NMI(expert; {key.split('_', 1)[1]})",
            )
    ax.set_xticks(np.arange(layers))
    ax.set_xlabel("layer")
    ax.set_ylabel("normalised mutual information")
    ax.set_title("C: expert specialisation — by modality (solid) vs by t-bucket (hatched)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return figure
