"""Problem D (docs/design.md §4): samples that get no supervised token.

A sample whose answer has L eligible tokens, drawn at noise level t, has each token masked with
p(t) = (1 - eps) t + eps, so it is left without any masked token with probability (1 - p(t))^L.
Over the configured t sampler and the manifest's answer-length distribution:

    single view           P0 = E_L E_t[(1 - p(t))^L]
    independent views     P0 = E_L E_t[((1 - p(t)) (1 - p(1 - t)))^L]   (view B at 1 - t, as trained)
    mirror views          P0 = E_L E_t[max(0, 1 - 2 p(t))^L]   (a token is masked in neither view when
                          p <= u <= 1 - p; both views at t)
    complementary views   P0 = P(L = 0) — every eligible token is masked in exactly one view

The expectation over t is computed by composite Gauss–Legendre quadrature: over [t_min, t_max]
for the uniform, band and stratified samplers (a stratified draw is marginally uniform), and over
the normal variable z for the logit-normal sampler (t = t_min + (t_max - t_min) σ(mean + std z)).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import numpy as np
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from dimoe.config.train import TimestepSpec
from dimoe.diag import plots
from dimoe.diag.driver import LogDiagnostic, Run, Summary, side_by_side, step_series, write_outputs
from dimoe.diag.logs import DiagError, Record
from dimoe.diffusion.forward import DEFAULT_MASK_EPS
from dimoe.io import iter_jsonl

VIEWS = ("single", "independent", "mirror", "complementary")
DEFINITION = (
    "expected fraction of samples with zero supervised tokens: E over the manifest's answer "
    "lengths L and the t sampler of P(no eligible token masked | L, t)"
)
# Composite rule: panels × nodes points. Enough to integrate (1 - t)^L exactly in effect for answers of
# thousands of tokens, whose mass sits within ~1/L of t = 0.
_PANELS, _NODES = 256, 32
# The logit-normal's z is integrated over ±_Z_RANGE standard deviations (the tails beyond hold < 1e-30).
_Z_RANGE = 12.0
# Answer lengths evaluated per chunk, bounding the (lengths × quadrature points) matrix in memory.
_LENGTH_CHUNK = 256


def _composite_rule(low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of composite Gauss–Legendre quadrature of ∫_low^high."""
    nodes, weights = np.polynomial.legendre.leggauss(_NODES)
    edges = np.linspace(low, high, _PANELS + 1)
    half = np.diff(edges)[:, None] / 2
    centre = (edges[:-1] + edges[1:])[:, None] / 2
    return (centre + half * nodes).ravel(), (half * weights).ravel()


def t_quadrature(sampler: TimestepSpec) -> tuple[np.ndarray, np.ndarray]:
    """Points t_i and probability weights w_i (Σ w_i = 1) with E[f(t)] ≈ Σ w_i f(t_i)."""
    low, high = sampler.t_min, sampler.t_max
    if sampler.kind == "uniform":
        low, high = 0.0, 1.0
    if sampler.kind in ("uniform", "band", "stratified"):
        t, weights = _composite_rule(low, high)
        return t, weights / (high - low)
    if sampler.kind == "logit_normal":
        z, weights = _composite_rule(-_Z_RANGE, _Z_RANGE)
        density = np.exp(-0.5 * z**2) / np.sqrt(2 * np.pi)
        t = low + (high - low) / (1.0 + np.exp(-(sampler.mean + sampler.std * z)))
        return t, weights * density
    raise ValueError(f"unknown t sampler kind {sampler.kind!r}")


def no_supervision_probability(
    lengths: np.ndarray, sampler: TimestepSpec, views: str = "single", eps: float = DEFAULT_MASK_EPS
) -> np.ndarray:
    """P(no supervised token | L) for each answer length in `lengths` (see the module docstring)."""
    _check_views(views)
    lengths = np.asarray(lengths, dtype=np.int64)
    if views == "complementary":
        return (lengths == 0).astype(float)
    t, weights = t_quadrature(sampler)
    # 1 - p(t) = (1 - eps)(1 - t); view B of the independent pair sits at 1 - t.
    keep = (1.0 - eps) * (1.0 - t)
    if views == "independent":
        keep = keep * (1.0 - eps) * t
    if views == "mirror":
        keep = np.clip(1.0 - 2.0 * ((1.0 - eps) * t + eps), 0.0, None)
    log_keep = np.log(np.clip(keep, 1e-300, None))
    out = np.empty(lengths.shape, dtype=float)
    flat = lengths.ravel()
    for start in range(0, flat.size, _LENGTH_CHUNK):
        chunk = flat[start : start + _LENGTH_CHUNK, None]
        out.flat[start : start + _LENGTH_CHUNK] = (np.exp(chunk * log_keep) * weights).sum(axis=1)
    return out


def expected_zero_supervision(
    lengths: np.ndarray, sampler: TimestepSpec, views: str = "single", eps: float = DEFAULT_MASK_EPS
) -> float:
    """P0: the mean over samples of P(no supervised token | L_i) (problem D, closed form)."""
    values, counts = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    probability = no_supervision_probability(values, sampler, views, eps)
    return float((probability * counts).sum() / counts.sum())


def _check_views(views: str) -> None:
    if views not in VIEWS:
        raise DiagError(f"unknown views {views!r} (valid: {', '.join(VIEWS)})")


def _timestep_spec(t_sampler: TimestepSpec | str) -> TimestepSpec:
    """A TimestepSpec as given, or a sampler kind name with its default parameters."""
    if isinstance(t_sampler, TimestepSpec):
        return t_sampler
    kinds = get_args(TimestepSpec.model_fields["kind"].annotation)
    if t_sampler not in kinds:
        raise DiagError(f"unknown t sampler {t_sampler!r} (valid: {', '.join(kinds)})")
    return TimestepSpec(kind=t_sampler)


def read_answer_lengths(manifest: str | Path) -> np.ndarray:
    """The `answer_length` column of a blend (a Parquet directory or file) or a JSON Lines file."""
    manifest = Path(manifest)
    if not manifest.exists():
        raise FileNotFoundError(f"manifest not found: {manifest} (a blend Parquet directory or a JSONL file)")
    values = _jsonl_lengths(manifest) if manifest.suffix == ".jsonl" else _parquet_lengths(manifest)
    if values.size == 0:
        raise DiagError(f"{manifest}: no rows")
    if (values < 0).any():
        raise DiagError(f"{manifest}: negative answer_length values")
    return values.astype(np.int64)


def _jsonl_lengths(manifest: Path) -> np.ndarray:
    lengths = []
    for number, row in iter_jsonl(manifest):
        if not isinstance(row.get("answer_length"), int):
            raise DiagError(f"{manifest}:{number}: needs an integer `answer_length`")
        lengths.append(row["answer_length"])
    return np.asarray(lengths, dtype=np.int64)


def _parquet_lengths(manifest: Path) -> np.ndarray:
    try:
        return pq.read_table(manifest, columns=["answer_length"])["answer_length"].to_numpy()
    except (KeyError, ValueError) as exc:  # no such column, or not Parquet (ArrowInvalid)
        raise DiagError(f"{manifest}: cannot read an `answer_length` column ({exc})") from None


def _observed(records: list[Record]) -> Summary:
    """Observed D of one run: Σ zero_supervision_samples / Σ samples, and per step."""
    zero = sum(record["zero_supervision_samples"] for record in records)
    samples = sum(record["samples"] for record in records)
    return {
        "fraction": zero / samples if samples else None,
        "zero_supervision_samples": zero,
        "samples": samples,
        "over_steps": [
            record["zero_supervision_samples"] / record["samples"] if record["samples"] else None
            for record in records
        ],
    }


OBSERVED = LogDiagnostic("train_metrics", ("zero_supervision_samples", "samples"), _observed)


def observed_zero_supervision(train_log: str | Path) -> Summary:
    """Observed D from `train_metrics.jsonl` (or its logs/ or stage folder): the run's summary."""
    summary, _ = OBSERVED.summary(train_log)
    return summary


def _expected(
    manifest: str | Path, lengths: np.ndarray, sampler: TimestepSpec, views: str, eps: float
) -> Summary:
    """The closed-form part of the summary: D of the manifest's answer lengths for every views mode."""
    expected = {kind: expected_zero_supervision(lengths, sampler, kind, eps) for kind in VIEWS}
    return {
        "definition": DEFINITION,
        "manifest": str(manifest),
        "samples": int(lengths.size),
        "answer_length": {
            "mean": float(lengths.mean()),
            "median": float(np.median(lengths)),
            "min": int(lengths.min()),
            "max": int(lengths.max()),
            "fraction_le_3": float((lengths <= 3).mean()),
        },
        "t_sampler": sampler.model_dump(),
        "views": views,
        "mask_eps": eps,
        "headline": {"D_zero_supervision": expected[views]},
        "expected": {
            "configured": expected[views],
            "single_view": expected["single"],
            "independent_views": expected["independent"],
            "mirror_views": expected["mirror"],
            "complementary": expected["complementary"],
        },
    }


def diag_supervision(
    manifest: str | Path,
    out_dir: str | Path,
    t_sampler: TimestepSpec | str = "uniform",
    *,
    views: str = "single",
    mask_eps: float = DEFAULT_MASK_EPS,
    train_log: str | Path | None = None,
    compare: str | Path | None = None,
) -> dict[str, Any]:
    """`dimoe diag supervision`: problem D for a manifest's answer lengths under `t_sampler` (a
    TimestepSpec, or a kind name with default parameters) with the configured `views`, plus the
    observed value of `train_log` (a `train_metrics.jsonl`, its logs/ dir or its stage dir) and of
    `compare` (another run's log) when given. From a train config pass `cfg.diffusion.timesteps`,
    `views=cfg.diffusion.views`, `mask_eps=cfg.diffusion.mask_eps`. Writes `summary.json` and PNGs."""
    sampler = _timestep_spec(t_sampler)
    _check_views(views)
    lengths = read_answer_lengths(manifest)
    summary = _expected(manifest, lengths, sampler, views, mask_eps)
    figures = {"no_supervision_vs_length.png": _plot_by_length(lengths, sampler, views, mask_eps)}
    runs = OBSERVED.runs(train_log, compare)
    if runs:
        summary["observed"] = side_by_side(runs)
        if train_log is not None:
            summary["headline"]["D_zero_supervision_observed"] = runs[0].summary["fraction"]
        figures["no_supervision_over_steps.png"] = _plot_observed(runs, summary["expected"]["configured"])
    return write_outputs(out_dir, summary, figures)


# Colour and legend of each views mode in the by-length plot.
VIEW_STYLES = {
    "single": ("tab:red", "single view (no complementary masking)"),
    "independent": ("tab:purple", "two independent views (t, 1 - t)"),
    "mirror": ("tab:blue", "mirror views (t, reflected masks)"),
    "complementary": ("tab:green", "complementary views"),
}


def _plot_by_length(lengths: np.ndarray, sampler: TimestepSpec, views: str, eps: float) -> Figure:
    """P(no supervision | L) for each views mode over answer lengths, on the manifest's length shares."""
    longest = max(int(lengths.max()), 16)
    grid = np.arange(1, longest + 1)
    figure, axes = plots.new_figure(1, 1, width=6.5, height=4.0)
    ax = axes[0, 0]
    counts = np.bincount(lengths, minlength=longest + 1)[1:]
    share = ax.twinx()
    share.bar(grid, counts / lengths.size, width=1.0, color="lightgray", label="answer-length share")
    share.set_ylabel("share of samples")
    # The curves above the bars: the twin axes would otherwise hide them.
    ax.set_zorder(share.get_zorder() + 1)
    ax.patch.set_visible(False)
    for kind in VIEWS:
        colour, label = VIEW_STYLES[kind]
        configured = kind == views
        ax.plot(
            grid,
            no_supervision_probability(grid, sampler, kind, eps),
            color=colour,
            linewidth=2.2 if configured else 1.3,
            label=label + (" [configured]" if configured else ""),
        )
    ax.set_xscale("log" if longest > 64 else "linear")
    ax.set_xlabel("answer length L (eligible tokens)")
    ax.set_ylabel("P(no supervised token | L)")
    ax.set_ylim(-0.02, 1.02)
    band = f"[{sampler.t_min:g}, {sampler.t_max:g}]" if sampler.kind != "uniform" else "[0, 1]"
    ax.set_title(f"D: P(no supervision) vs answer length — t ~ {sampler.kind} {band}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return figure


def _plot_observed(runs: list[Run], expected: float) -> Figure:
    """Observed D over steps per run, against the configured closed-form value."""
    figure, axes = plots.new_figure(1, 1, width=6.0)
    ax = axes[0, 0]
    plots.plot_series(
        ax,
        step_series(runs, "over_steps"),
        "D: observed fraction of samples without supervision",
        "zero-supervision fraction",
    )
    ax.axhline(expected, color="gray", linestyle="--", label=f"expected (configured): {expected:.3f}")
    ax.legend(fontsize=8)
    return figure
