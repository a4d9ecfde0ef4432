"""`diag routing` and `diag gradient` on small synthetic logs that follow docs/telemetry.md."""

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dimoe.cli import app
from dimoe.diag import diag_gradient, diag_routing
from dimoe.diag.gradient import GRADIENT
from dimoe.diag.stats import js_divergence
from dimoe.errors import UserError


def write_log(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def routing_record(step: int, overlap: list[float] | None) -> dict:
    """2 layers, 2 t-buckets, 4 experts. Layer 0 sends each bucket to its own expert and each
    modality to its own experts; layer 1 routes uniformly everywhere."""
    return {
        "step": step,
        "num_buckets": 2,
        "expert_load": [[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], [[0.25] * 4, [0.25] * 4]],
        "bucket_tokens": [10.0, 10.0],
        "router_entropy": [0.1, 1.3],
        "topk_overlap": overlap,
        "view_consistency_kl": [0.2, 0.1] if overlap is not None else None,
        "modality_usage": [
            {"image": [10, 0, 0, 0], "prompt": [0, 10, 0, 0], "response": [0, 0, 10, 10]},
            {"image": [5, 5, 5, 5], "prompt": [5, 5, 5, 5], "response": [5, 5, 5, 5]},
        ],
    }


def gradient_record(step: int, scale: float = 1.0) -> dict:
    return {
        "step": step,
        "vision": 3.0 * scale,
        "projector": 4.0 * scale,
        "attention": 1.0,
        "router": 0.1,
        "other": 2.0,
        "experts": [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]],
        "backbone": 10.0,
    }


def test_diag_routing_computes_a_b_c_and_writes_plots(tmp_path: Path) -> None:
    write_log(
        tmp_path / "stage2_full/logs/routing_stats.jsonl",
        [routing_record(10, [0.6, 0.8]), routing_record(5, [0.4, 0.6])],
    )
    summary = diag_routing(tmp_path / "stage2_full", tmp_path / "out")
    assert summary["run"] == "stage2_full"
    assert summary["steps"] == [5, 10]  # sorted by step
    js = js_divergence([1, 0], [0.5, 0.5])  # each bucket of layer 0 against the mean; layer 1 is 0
    assert summary["headline"]["A_routing_js"] == pytest.approx(js / 2)
    assert summary["A_nonstationarity"]["per_layer_last"] == pytest.approx([js, 0.0])
    assert summary["headline"]["B_topk_jaccard"] == pytest.approx(0.7)
    assert summary["B_inconsistency"]["over_steps"] == pytest.approx([0.5, 0.7])
    assert summary["headline"]["C_nmi_modality"] == pytest.approx((6 / 7 + 0.0) / 2)
    assert summary["headline"]["C_nmi_t_bucket"] == pytest.approx((1.0 + 0.0) / 2)
    assert json.loads((tmp_path / "out/summary.json").read_text())["headline"] == summary["headline"]
    names = {Path(p).name for p in summary["plots"]}
    assert names == {"expert_load_by_t_bucket.png", "routing_over_steps.png", "specialisation.png"}
    assert all(Path(p).stat().st_size > 1000 for p in summary["plots"])


def test_diag_routing_compare_puts_runs_side_by_side(tmp_path: Path) -> None:
    this = write_log(tmp_path / "dmar/logs/routing_stats.jsonl", [routing_record(5, [0.9, 0.9])])
    other = write_log(tmp_path / "naive/logs/routing_stats.jsonl", [routing_record(5, None)])  # one view
    summary = diag_routing(this, tmp_path / "out", compare=other)
    assert summary["this"]["run"] == "dmar" and summary["other"]["run"] == "naive"
    assert summary["this"]["headline"]["B_topk_jaccard"] == pytest.approx(0.9)
    assert summary["other"]["headline"]["B_topk_jaccard"] is None
    assert set(json.loads((tmp_path / "out/summary.json").read_text())) >= {"this", "other", "plots"}


def test_diag_gradient_computes_e_and_f(tmp_path: Path) -> None:
    write_log(tmp_path / "run/logs/gradient_stats.jsonl", [gradient_record(1), gradient_record(2, scale=2.0)])
    write_log(tmp_path / "base/logs/gradient_stats.jsonl", [gradient_record(1, scale=0.0)])
    summary = diag_gradient(tmp_path / "run/logs", tmp_path / "out", compare=tmp_path / "base")
    this, other = summary["this"], summary["other"]
    assert this["E_vision_imbalance"]["over_steps"] == pytest.approx([0.5, 1.0])  # ||(3, 4)|| / 10
    assert other["headline"]["E_vision_grad_ratio"] == 0.0  # frozen vision tower
    # Layer 0: CV sqrt(1.25)/2.5, Gini 0.25; layer 1: CV sqrt(3), Gini 0.75; layer 2 (no gradient) left out.
    assert this["headline"]["F_expert_grad_cv"] == pytest.approx((math.sqrt(1.25) / 2.5 + math.sqrt(3)) / 2)
    assert this["headline"]["F_expert_grad_gini"] == pytest.approx(0.5)
    assert this["F_expert_imbalance"]["per_layer_last"]["cv"][2] is None
    assert {Path(p).name for p in summary["plots"]} == {
        "vision_grad_ratio_over_steps.png",
        "expert_grad_spread.png",
    }


def test_diag_names_the_missing_log_and_the_bad_record(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no routing_stats.jsonl log"):
        diag_routing(tmp_path, tmp_path / "out")
    write_log(tmp_path / "logs/gradient_stats.jsonl", [{"step": 1, "vision": 1.0}])
    with pytest.raises(
        ValueError, match=r"gradient_stats.jsonl:1: missing field\(s\) projector, backbone, experts"
    ):
        diag_gradient(tmp_path, tmp_path / "out")


def test_same_named_runs_are_labelled_by_role_and_summary_json_is_the_result(tmp_path: Path) -> None:
    this = write_log(tmp_path / "a/stage2_full/logs/gradient_stats.jsonl", [gradient_record(1)])
    other = write_log(tmp_path / "b/stage2_full/logs/gradient_stats.jsonl", [gradient_record(1, 2.0)])
    assert [run.label for run in GRADIENT.runs(this, other)] == ["this", "other"]
    assert [run.label for run in GRADIENT.runs(this, None)] == ["stage2_full"]
    summary = diag_gradient(this, tmp_path / "out", compare=other)
    assert summary["this"]["run"] == summary["other"]["run"] == "stage2_full"
    assert json.loads((tmp_path / "out/summary.json").read_text()) == summary
    assert summary["summary"] == str(tmp_path / "out/summary.json")


def test_a_bad_log_is_a_user_error_naming_file_and_line(tmp_path: Path) -> None:
    log = tmp_path / "run/logs/gradient_stats.jsonl"
    write_log(log, [gradient_record(1)])
    log.write_text(log.read_text() + "{not json\n")
    with pytest.raises(UserError, match=r"gradient_stats.jsonl:2: not valid JSON"):
        diag_gradient(tmp_path / "run", tmp_path / "out")
    log.write_text("\n")
    with pytest.raises(UserError, match="no records"):
        diag_gradient(log, tmp_path / "out")
    result = CliRunner().invoke(
        app, ["diag", "gradient", "--log", str(log), "--out-dir", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "no records" in result.stderr.replace("\n", "")  # console wraps
