"""`summarize` and the paper tables on synthetic scores.json files."""

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dimoe.eval.paper import export_paper_tables, latex_escape
from dimoe.eval.summarize import load_runs, summarize


def task_entry(score: float, n: int = 10, nfe: float = 8.0) -> dict:
    return {
        "status": "done",
        "n": n,
        "score": score,
        "mean_nfe": nfe,
        "mean_latency_s": 0.5,
        "tokens_per_s": 100.0,
        "nfe_x_active_params_b": nfe * 1.5,
        "strategy": "threshold",
        "preset": "x",
    }


def write_run(root: Path, name: str, model: str, preset: str, strategy: str, tasks: dict) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    scores = {
        "suite": "demo",
        "model": model,
        "checkpoint": f"/ckpt/{model}",
        "preset": preset,
        "strategy": strategy,
        "settings": {},
        "active_params_b": 1.5,
        "tasks": tasks,
    }
    (run_dir / "scores.json").write_text(json.dumps(scores))
    return run_dir


@pytest.fixture
def eval_root(tmp_path: Path) -> Path:
    root = tmp_path / "eval"
    write_run(
        root,
        "s3_best",
        "stage3_lownfe/final",
        "best",
        "threshold",
        {"demo_vqa_colour": task_entry(0.9, nfe=32), "gqa": task_entry(0.5, n=30, nfe=24)},
    )
    write_run(
        root,
        "s3_fast",
        "stage3_lownfe/final",
        "fast",
        "threshold",
        {"demo_vqa_colour": task_entry(0.8), "gqa": {"status": "skipped", "reason": "data file not found"}},
    )
    write_run(
        root,
        "s0_fast",
        "stage0_naive/final",
        "fast",
        "llada",
        {"demo_vqa_colour": task_entry(0.4), "gqa": task_entry(0.2)},
    )
    return root


def test_summarize_writes_markdown_and_csv_across_presets_and_strategies(
    eval_root: Path, tmp_path: Path
) -> None:
    paths = summarize(eval_root, tmp_path / "summary")
    runs = load_runs(eval_root)
    # Sorted by model, then preset from fast to best.
    assert [(run.model, run.preset) for run in runs] == [
        ("stage0_naive/final", "fast"),
        ("stage3_lownfe/final", "fast"),
        ("stage3_lownfe/final", "best"),
    ]
    markdown = paths["markdown"].read_text()
    assert "| Model | Preset | Strategy | demo_vqa_colour | gqa | Avg |" in markdown
    assert "| stage3_lownfe/final | fast | threshold | 80.0 | – | 80.0 |" in markdown
    assert "| stage3_lownfe/final | best | threshold | 90.0 | 50.0 | 70.0 |" in markdown
    # Cost weighted by examples: (10 · 32 + 30 · 24) / 40 = 26 NFE, × 1.5 B active.
    assert "| stage3_lownfe/final | best | threshold | 26.0 | 39.000 | 100.0 | 0.500 |" in markdown
    assert "gqa — data file not found" in markdown
    with paths["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6
    skipped = next(row for row in rows if row["status"] == "skipped")
    assert skipped["task"] == "gqa" and skipped["reason"] == "data file not found" and skipped["score"] == ""
    assert summarize([eval_root / "s3_fast"], tmp_path / "one")["markdown"].is_file()
    # The CLI passes a list: a parent of runs in it stands for every run below it.
    summarize([eval_root], tmp_path / "parent")
    assert (tmp_path / "parent" / "summary.md").read_text() == markdown


def test_summarize_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no scores.json in or below .*eval run` --out-dir"):
        summarize(tmp_path, tmp_path / "out")
    run = write_run(tmp_path, "run", "m", "best", "llada", {"demo_vqa_colour": task_entry(0.5)})
    absent = re.escape(f"no scores.json in or below {tmp_path / 'absent'}:")
    with pytest.raises(FileNotFoundError, match=absent):
        summarize([run, tmp_path / "absent"], tmp_path / "out")


def write_tune_csv(path: Path) -> Path:
    header = [
        "trial_id",
        "config/variant",
        "accuracy_best",
        "accuracy_fast",
        "nfe_best",
        "nfe_fast",
        "A_routing_js",
        "B_topk_jaccard",
        "D_zero_supervision",
        "F_expert_grad_cv",
    ]
    rows = [
        ["t1", "naive_attach", "0.40", "0.30", "16", "6", "0.20", "", "0.08", "1.4"],
        ["t2", "+DMAR", "0.50", "0.42", "12", "5", "0.05", "0.61", "0.08", "1.1"],
        ["t3", "+DMAR", "0.52", "0.44", "12", "5", "0.07", "0.65", "0.08", "1.0"],  # second seed
        ["t4", "+DMAR+EBCMC", "0.55", "0.50", "8", "4", "0.04", "0.70", "0.0", "0.9"],
    ]
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


def check_latex_table(text: str) -> None:
    """Balanced braces, booktabs rules in order, no bare underscore, equal cell counts per row."""
    depth = 0
    for index, char in enumerate(text):
        if char in "{}" and (index == 0 or text[index - 1] != "\\"):
            depth += 1 if char == "{" else -1
            assert depth >= 0, f"unbalanced }} at {index}"
    assert depth == 0
    positions = [
        text.index(rule)
        for rule in (r"\begin{tabular}", r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}")
    ]
    assert positions == sorted(positions)
    outside_math = re.sub(r"\$[^$]*\$", "", text)
    assert not re.search(r"(?<!\\)_", outside_math), "unescaped underscore"
    columns = len(re.search(r"\\begin\{tabular\}\{([lr]+)\}", text).group(1))
    body = text[text.index(r"\toprule") : text.index(r"\bottomrule")]
    rows = [line for line in body.splitlines() if line.endswith(r"\\")]
    assert rows and all(len(re.findall(r"(?<!\\)&", row)) == columns - 1 for row in rows)


def test_paper_tables_are_valid_booktabs_latex_and_markdown(eval_root: Path, tmp_path: Path) -> None:
    paths = export_paper_tables(
        eval_root, tmp_path / "paper", tune_results=write_tune_csv(tmp_path / "tune.csv")
    )
    assert set(paths) == {"main_results_tex", "main_results_md", "ablation_tex", "ablation_md"}
    main = paths["main_results_tex"].read_text()
    check_latex_table(main)
    assert r"demo\_vqa\_colour" in main and r"stage3\_lownfe/final" in main
    # Preset blocks fast → best; within fast the best colour score (80.0) is bold.
    assert main.index("fast &") < main.index("best &")
    assert r"\textbf{80.0}" in main and r"\textbf{40.0}" not in main
    ablation = paths["ablation_tex"].read_text()
    check_latex_table(ablation)
    assert r"+DMAR+EBCMC" in ablation and r"naive\_attach" in ablation
    assert "51.0" in ablation  # the two +DMAR seeds averaged
    assert "NMI" not in ablation  # C columns are absent from the CSV, so not in the table
    assert r"\textbf{0.040}" in ablation  # lowest A is best
    md = paths["ablation_md"].read_text()
    assert "| Variant | Acc. best | Acc. fast | NFE best | NFE fast | A: JS ↓ |" in md and "**55.0**" in md
    assert latex_escape(r"a_b & 50% #1 {x} ~^\ ") == (
        r"a\_b \& 50\% \#1 \{x\} \textasciitilde{}"
        r"\textasciicircum{}\textbackslash{} "
    )


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed on this machine")
def test_paper_tables_compile_with_pdflatex(eval_root: Path, tmp_path: Path) -> None:
    paths = export_paper_tables(eval_root, tmp_path, tune_results=write_tune_csv(tmp_path / "tune.csv"))
    document = tmp_path / "tables.tex"
    document.write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
        f"\\input{{{paths['main_results_tex'].name}}}\n\\input{{{paths['ablation_tex'].name}}}\n"
        "\\end{document}\n"
    )
    result = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", document.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:]
