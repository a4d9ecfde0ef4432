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

from dimoe.diag import plots
from dimoe.diag.logs import Record, compared, finite_or_none, read_log, run_name, series_mean, write_summary
from dimoe.diag.stats import js_divergence, normalized_mutual_information

STREAM = "routing_stats"
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


def _layer_mean(values: list[float | None]) -> float | None:
    return finite_or_none(series_mean(values))


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
        "A": _layer_mean(a_layers),
        "A_per_layer": a_layers,
        "B": _layer_mean(b_layers) if b_layers is not None else None,
        "B_per_layer": b_layers,
        "C_modality": _layer_mean([modality for modality, _ in c_layers]),
        "C_t_bucket": _layer_mean([bucket for _, bucket in c_layers]),
        "C_modality_per_layer": [modality for modality, _ in c_layers],
        "C_t_bucket_per_layer": [bucket for _, bucket in c_layers],
    }


def run_metrics(log_path: str | Path) -> tuple[dict[str, Any], list[Record]]:
    """The routing summary of one run and its records (for the plots)."""
    log, records = read_log(log_path, STREAM, ("expert_load", "bucket_tokens", "modality_usage"))
    per_step = [record_metrics(record) for record in records]
    steps = [record["step"] for record in records]
    last, last_record = per_step[-1], records[-1]

    def over_steps(key: str) -> list[float | None]:
        return [metrics[key] for metrics in per_step]

    summary = {
        "run": run_name(log),
        "source": str(log),
        "steps": steps,
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
            "definition": DEFINITIONS["A"],
            "last": last["A"],
            "mean_over_steps": series_mean(over_steps("A")),
            "per_layer_last": last["A_per_layer"],
            "over_steps": over_steps("A"),
        },
        "B_inconsistency": {
            "definition": DEFINITIONS["B"],
            "last": last["B"],
            "mean_over_steps": series_mean(over_steps("B")),
            "per_layer_last": last["B_per_layer"],
            "over_steps": over_steps("B"),
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
                "nmi_modality": over_steps("C_modality"),
                "nmi_t_bucket": over_steps("C_t_bucket"),
            },
        },
    }
    return summary, records


def diag_routing(
    log_path: str | Path, out_dir: str | Path, compare: str | Path | None = None
) -> dict[str, Any]:
    """`dimoe diag routing`: problems A, B and C of one run (or two, with `compare`); writes
    `summary.json` and PNGs into `out_dir` and returns the summary."""
    out_dir = Path(out_dir)
    runs = [run_metrics(log_path)]
    if compare is not None:
        runs.append(run_metrics(compare))
    summaries = [summary for summary, _ in runs]
    result = compared(summaries[0], summaries[1] if compare is not None else None)
    result["plots"] = [
        _plot_load_heatmaps(runs, out_dir / "expert_load_by_t_bucket.png"),
        _plot_over_steps(summaries, out_dir / "routing_over_steps.png"),
        _plot_specialisation(summaries, out_dir / "specialisation.png"),
    ]
    result["summary"] = str(out_dir / "summary.json")
    write_summary(out_dir, result)
    return result


def _labels(summaries: list[dict[str, Any]]) -> list[str]:
    names = [summary["run"] for summary in summaries]
    # Two runs of the same stage name (different output dirs) still need distinct legend entries.
    return names if len(set(names)) == len(names) else ["this", "other"][: len(names)]


def _plot_load_heatmaps(runs: list[tuple[dict[str, Any], list[Record]]], path: Path) -> str:
    labels = _labels([summary for summary, _ in runs])
    layers = max(summary["num_layers"] for summary, _ in runs)
    rows_per_run, cols = plots.grid_shape(layers)
    figure, axes = plots.new_figure(rows_per_run * len(runs), cols, width=3.6, height=2.6)
    vmax = max(float(np.max(records[-1]["expert_load"])) for _, records in runs) or 1.0
    for run_index, ((summary, records), label) in enumerate(zip(runs, labels, strict=True)):
        block = axes[run_index * rows_per_run : (run_index + 1) * rows_per_run]
        for layer, load in enumerate(records[-1]["expert_load"]):
            plots.heatmap(
                figure,
                block.flat[layer],
                np.asarray(load, dtype=float),
                f"{label} · layer {layer} (step {summary['steps'][-1]})",
                "expert",
                "t-bucket",
                vmax,
            )
        plots.hide_unused(block, len(records[-1]["expert_load"]))
    figure.suptitle("Expert load per t-bucket (fraction of top-k assignments of visible tokens)")
    return plots.save(figure, path)


def _plot_over_steps(summaries: list[dict[str, Any]], path: Path) -> str:
    labels = _labels(summaries)
    figure, axes = plots.new_figure(1, 2)
    plots.plot_series(
        axes[0, 0],
        [
            (label, s["steps"], s["A_nonstationarity"]["over_steps"])
            for label, s in zip(labels, summaries, strict=True)
        ],
        "A: routing non-stationarity",
        "mean JS divergence (bits)",
    )
    plots.plot_series(
        axes[0, 1],
        [
            (label, s["steps"], s["B_inconsistency"]["over_steps"])
            for label, s in zip(labels, summaries, strict=True)
        ],
        "B: top-k consistency between views",
        "mean Jaccard overlap",
    )
    if all(s["B_inconsistency"]["last"] is None for s in summaries):
        axes[0, 1].text(
            0.5, 0.5, "single-view run: no view overlap logged", ha="center", transform=axes[0, 1].transAxes
        )
    return plots.save(figure, path)


def _plot_specialisation(summaries: list[dict[str, Any]], path: Path) -> str:
    labels = _labels(summaries)
    figure, axes = plots.new_figure(1, 1, width=max(5.0, 1.2 * summaries[0]["num_layers"] + 2))
    ax = axes[0, 0]
    width = 0.8 / (2 * len(summaries))
    for index, (summary, label, colour) in enumerate(zip(summaries, labels, plots.RUN_COLOURS, strict=False)):
        per_layer = summary["C_specialisation"]["per_layer_last"]
        layers = np.arange(len(per_layer["nmi_modality"]))
        for kind, (key, hatch) in enumerate((("nmi_modality", ""), ("nmi_t_bucket", "//"))):
            values = [value if value is not None else 0.0 for value in per_layer[key]]
            offset = (2 * index + kind - len(summaries) + 0.5) * width
            ax.bar(
                layers + offset,
                values,
                width,
                color=colour,
                hatch=hatch,
                edgecolor="black",
                linewidth=0.5,
                alpha=1.0 if kind == 0 else 0.55,
                label=f"{label}: NMI(expert; {key.split('_', 1)[1]})",
            )
    ax.set_xticks(np.arange(max(summary["num_layers"] for summary in summaries)))
    ax.set_xlabel("layer")
    ax.set_ylabel("normalised mutual information")
    ax.set_title("C: expert specialisation — by modality (solid) vs by t-bucket (hatched)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return plots.save(figure, path)
