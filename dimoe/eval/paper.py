"""Paper tables: LaTeX (`booktabs`) and Markdown from evaluation runs and the Tune ablation grid.

    paths = export_paper_tables("artifacts/eval", "artifacts/paper", tune_results="artifacts/tune/all.csv")

`main_results.tex` / `.md`: one block of rows per preset (fast → best), one row per model and
strategy: the score of every task (%), their average (when the run has every task), mean NFE and
NFE × active parameters (billions); the best score of each column within a preset is bold.

`ablation.tex` / `.md` (with `tune_results`): one row per variant of a Tune results CSV (rows of
the same variant, e.g. seeds, are averaged). Columns are found by name, exactly or as the last
`/` part of a flattened Tune column (`config/variant`, `diag/A_routing_js`):

    variant                     required
    accuracy_best, accuracy_fast    fractions in [0, 1], as in scores.json
    nfe_best, nfe_fast          mean forward passes per answer at those presets
    A_routing_js, B_topk_jaccard, C_nmi_modality, C_nmi_t_bucket, D_zero_supervision,
    E_vision_grad_ratio, F_expert_grad_cv    the `headline` values of `dimoe diag`

Metric columns absent from the CSV are left out of the table. The .tex files hold a `table`
environment to `\\input` into a document that loads `booktabs`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dimoe.errors import UserError
from dimoe.eval.summarize import (
    PRESET_ORDER,
    EvalRun,
    average_score,
    decoding_cost,
    load_runs,
    markdown_table,
    number,
    percent,
    task_names,
)

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "–": "--",
}  # the en dash of empty cells, as pdflatex without inputenc extras reads it


def latex_escape(text: str) -> str:
    """Text with LaTeX's special characters escaped (so `demo_vqa` prints as written)."""
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


@dataclass(frozen=True)
class Table:
    """A table in both renderings: LaTeX headers may hold math; cells are plain text (escaped on
    output) and `bold` marks (row, column) cells to emphasise."""

    caption: str
    label: str
    latex_header: list[str]
    markdown_header: list[str]
    rows: list[list[str]]
    group_starts: frozenset[int] = frozenset()  # rows preceded by a \midrule
    bold: frozenset[tuple[int, int]] = frozenset()
    text_columns: int = 1  # leading left-aligned columns; the rest are right-aligned numbers

    def latex(self) -> str:
        align = "l" * self.text_columns + "r" * (len(self.latex_header) - self.text_columns)
        lines = [
            r"\begin{table}[t]",
            r"\centering",
            r"\small",
            f"\\caption{{{latex_escape(self.caption)}}}",
            f"\\label{{{self.label}}}",
            f"\\begin{{tabular}}{{{align}}}",
            r"\toprule",
            " & ".join(self.latex_header) + r" \\",
            r"\midrule",
        ]
        for index, row in enumerate(self.rows):
            if index in self.group_starts and index > 0:
                lines.append(r"\midrule")
            cells = [
                f"\\textbf{{{latex_escape(cell)}}}" if (index, column) in self.bold else latex_escape(cell)
                for column, cell in enumerate(row)
            ]
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        return "\n".join(lines) + "\n"

    def markdown(self) -> str:
        rows = [
            [f"**{cell}**" if (index, column) in self.bold else cell for column, cell in enumerate(row)]
            for index, row in enumerate(self.rows)
        ]
        return f"**{self.caption}**\n\n" + markdown_table(self.markdown_header, rows)


def _best_cells(
    values: Sequence[Sequence[float | None]],
    rows: Sequence[int],
    columns: Sequence[int],
    better: Callable[[float, float], bool] = lambda a, b: a > b,
) -> set[tuple[int, int]]:
    """(row, column) of the best value of each column among `rows` (ties all bold)."""
    cells = set()
    for column in columns:
        defined = [(row, values[row][column]) for row in rows if values[row][column] is not None]
        if len(defined) < 2:
            continue  # a lone value is not "best" of anything
        best = defined[0][1]
        for _, value in defined[1:]:
            best = value if better(value, best) else best
        cells.update((row, column) for row, value in defined if value == best)
    return cells


def main_results_table(runs: Sequence[EvalRun]) -> Table:
    """Scores per task and decoding cost, grouped by preset (see the module docstring)."""
    tasks = task_names(runs)
    presets = sorted(
        {run.preset for run in runs},
        key=lambda name: (PRESET_ORDER.index(name) if name in PRESET_ORDER else len(PRESET_ORDER), name),
    )
    rows: list[list[str]] = []
    scores: list[list[float | None]] = []
    group_starts, bold = set(), set()
    for preset in presets:
        group = [run for run in runs if run.preset == preset]
        group_starts.add(len(rows))
        first = len(rows)
        for run in group:
            cost = decoding_cost(run)
            values = [run.done[name]["score"] if name in run.done else None for name in tasks]
            # An average over fewer tasks is not comparable with the others: left empty.
            values.append(average_score(run, tasks) if None not in values else None)
            # Preset and model/strategy columns are text; scores follow from column 3 on.
            scores.append([None, None, None, *values])
            rows.append(
                [
                    preset if run is group[0] else "",
                    run.model,
                    run.strategy,
                    *map(percent, values),
                    number(cost["mean_nfe"], 1),
                    number(cost["nfe_x_active_params_b"], 3),
                ]
            )
        bold |= _best_cells(scores, range(first, len(rows)), range(3, 3 + len(tasks) + 1))
    task_headers = [latex_escape(name) for name in tasks]
    return Table(
        caption="Main results: score (%) per task and preset; NFE is the mean number of forward passes per "
        "request, NFE x Act. the mean NFE times the active parameters (billions).",
        label="tab:main-results",
        latex_header=["Preset", "Model", "Strategy", *task_headers, "Avg.", "NFE", r"NFE$\times$Act.\,(B)"],
        markdown_header=["Preset", "Model", "Strategy", *tasks, "Avg.", "NFE", "NFE × active (B)"],
        rows=rows,
        group_starts=frozenset(group_starts),
        bold=frozenset(bold),
        text_columns=3,
    )


@dataclass(frozen=True)
class AblationColumn:
    key: str
    latex: str
    markdown: str
    render: Callable[[float | None], str]
    higher_is_better: bool | None  # None: no "best" to mark


ABLATION_COLUMNS = (
    AblationColumn("accuracy_best", "Acc.\\ best", "Acc. best", percent, True),
    AblationColumn("accuracy_fast", "Acc.\\ fast", "Acc. fast", percent, True),
    AblationColumn("describe_f1_best", "Descr.\\ F1", "Describe F1", percent, True),
    AblationColumn(
        "heldout_loss", r"Held-out loss$\downarrow$", "Held-out loss ↓", lambda value: number(value, 3), False
    ),
    AblationColumn("nfe_best", "NFE best", "NFE best", lambda value: number(value, 1), False),
    AblationColumn("nfe_fast", "NFE fast", "NFE fast", lambda value: number(value, 1), False),
    AblationColumn("A_routing_js", r"A: JS$\downarrow$", "A: JS ↓", lambda value: number(value, 3), False),
    AblationColumn(
        "B_topk_jaccard", r"B: Jacc.$\uparrow$", "B: Jaccard ↑", lambda value: number(value, 3), True
    ),
    AblationColumn(
        "C_nmi_modality",
        r"C: NMI$_\mathrm{mod}\uparrow$",
        "C: NMI modality ↑",
        lambda value: number(value, 3),
        True,
    ),
    AblationColumn(
        "C_nmi_t_bucket", r"C: NMI$_t\downarrow$", "C: NMI t ↓", lambda value: number(value, 3), False
    ),
    AblationColumn(
        "D_zero_supervision", r"D: $P_0\downarrow$", "D: P0 ↓", lambda value: number(value, 3), False
    ),
    AblationColumn(
        "E_vision_grad_ratio",
        r"E: $\|g_v\|/\|g_b\|$",
        "E: vision/backbone grad",
        lambda value: number(value, 3),
        None,
    ),
    AblationColumn(
        "F_expert_grad_cv", r"F: CV$\downarrow$", "F: expert grad CV ↓", lambda value: number(value, 3), False
    ),
)


def _find_column(fieldnames: Sequence[str], key: str) -> str | None:
    for name in fieldnames:
        if name == key or name.endswith("/" + key):
            return name
    return None


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def read_ablation(path: str | Path) -> tuple[list[str], list[AblationColumn], list[list[float | None]]]:
    """Variants (first-appearance order), the metric columns present, and per variant the mean of
    each column over its rows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Tune results CSV not found: {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fieldnames = reader.fieldnames or []
        records = list(reader)
    variant_column = _find_column(fieldnames, "variant")
    if variant_column is None:
        raise UserError(
            f"{path}: needs a `variant` column (or `config/variant`); found: {', '.join(fieldnames)}"
        )
    present = [(column, _find_column(fieldnames, column.key)) for column in ABLATION_COLUMNS]
    present = [(column, name) for column, name in present if name is not None]
    grouped: dict[str, list[dict[str, str]]] = {}
    for record in records:
        grouped.setdefault(record[variant_column], []).append(record)
    means = []
    for group in grouped.values():
        row = []
        for _, name in present:
            values = [value for value in (_float(record[name]) for record in group) if value is not None]
            row.append(sum(values) / len(values) if values else None)
        means.append(row)
    return list(grouped), [column for column, _ in present], means


def ablation_table(tune_results: str | Path) -> Table:
    variants, columns, values = read_ablation(tune_results)
    rows = [
        [variant, *(column.render(value) for column, value in zip(columns, row, strict=True))]
        for variant, row in zip(variants, values, strict=True)
    ]
    shifted = [[None, *row] for row in values]  # column 0 is the variant name
    bold: set[tuple[int, int]] = set()
    for index, column in enumerate(columns, start=1):
        if column.higher_is_better is not None:
            better = (lambda a, b: a > b) if column.higher_is_better else (lambda a, b: a < b)
            bold |= _best_cells(shifted, range(len(rows)), [index], better)
    return Table(
        caption="Ablations (means over seeds): VQA accuracy with the best and fast presets, description "
        "token F1, NFE, and the A-F diagnostics (arrows: which direction is better).",
        label="tab:ablation",
        latex_header=["Variant", *(column.latex for column in columns)],
        markdown_header=["Variant", *(column.markdown for column in columns)],
        rows=rows,
        bold=frozenset(bold),
    )


def export_paper_tables(
    eval_dir_root: str | Path, out_dir: str | Path, tune_results: str | Path | None = None
) -> dict[str, Path]:
    """`dimoe tools export-paper-tables`: write main_results.{tex,md} from every eval run under
    `eval_dir_root`, and ablation.{tex,md} from `tune_results` when given; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {"main_results": main_results_table(load_runs(eval_dir_root))}
    if tune_results is not None:
        tables["ablation"] = ablation_table(tune_results)
    paths: dict[str, Path] = {}
    for name, table in tables.items():
        paths[f"{name}_tex"] = out_dir / f"{name}.tex"
        paths[f"{name}_tex"].write_text(table.latex(), encoding="utf-8")
        paths[f"{name}_md"] = out_dir / f"{name}.md"
        paths[f"{name}_md"].write_text(table.markdown(), encoding="utf-8")
    return paths
