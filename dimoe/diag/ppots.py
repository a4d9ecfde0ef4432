"""P-POTS's estimates of the loss over the noise level t (dimoe/diffusion/ppots.py), from a run's
`ppots.jsonl` (one record per estimate: the t grid, m(t), v(t), w(t) and the clamped fraction).

    summary = diag_ppots("artifacts/train/stage2_full", "artifacts/diag/stage2_full/ppots")

Writes `summary.json` and, for the last estimate of each run, m(t), sqrt(v(t)) and the proposal
shape w(t) normalised over the grid (where P-POTS puts its samples of t).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from dimoe.diag import plots
from dimoe.diag.driver import LogDiagnostic, Run, Summary, diagnose
from dimoe.diag.logs import Record

DEFINITION = (
    "m(t), v(t): mean and variance over rows and masks of the per-row weighted loss at t; "
    "w(t) = sqrt(v + m^2) is the shape of the variance-minimising proposal of t; `contrast` is "
    "max w / min w over the grid (1: P-POTS samples t uniformly)"
)


def _summarise(records: list[Record]) -> Summary:
    last = records[-1]
    total = sum(last["w"])
    return {
        "definition": DEFINITION,
        "estimates": len(records),
        "last": {
            "t": last["t"],
            "m": last["m"],
            "v": last["v"],
            "proposal_share": [w / total for w in last["w"]] if total > 0 else None,
            "contrast": max(last["w"]) / min(last["w"]) if min(last["w"]) > 0 else None,
            "clamped_fraction": last.get("clamped_fraction"),
        },
        "contrast_over_estimates": [max(r["w"]) / min(r["w"]) if min(r["w"]) > 0 else None for r in records],
    }


PPOTS = LogDiagnostic("ppots", ("t", "m", "v", "w"), _summarise)


def _figures(runs: list[Run]) -> dict[str, Figure]:
    figure, axes = plots.new_figure(1, 3)
    for colour, run in zip(plots.RUN_COLOURS, runs, strict=False):
        last = run.records[-1]
        total = sum(last["w"])
        curves = (last["m"], [v**0.5 for v in last["v"]], [w / total for w in last["w"]])
        for ax, values in zip(axes[0], curves, strict=True):
            ax.plot(last["t"], values, marker="o", markersize=3, color=colour, label=run.label)
    for ax, title in zip(
        axes[0], ("mean loss m(t)", "spread sqrt(v(t))", "proposal share w(t)"), strict=True
    ):
        ax.set_title(title)
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
        ax.legend()
    return {"ppots_fit.png": figure}


def diag_ppots(log: str | Path, out_dir: str | Path, compare: str | Path | None = None) -> Summary:
    """`dimoe diag ppots`: the last P-POTS estimate of the run at `log` (and of `compare`)."""
    return diagnose(PPOTS, log, out_dir, compare, _figures)
