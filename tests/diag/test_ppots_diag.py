"""`dimoe diag ppots` on a hand-written estimate log: its summary against hand-computed values."""

import json

import pytest
from typer.testing import CliRunner

from dimoe.cli import app
from dimoe.diag.logs import DiagError
from dimoe.diag.ppots import diag_ppots

RECORDS = [
    {
        "step": 0,
        "t": [0.25, 0.75],
        "m": [4.0, 3.0],
        "v": [9.0, 0.0],
        "w": [5.0, 3.0],
        "clamped_fraction": 0.0,
    },
    {
        "step": 2,
        "t": [0.25, 0.75],
        "m": [3.0, 2.0],
        "v": [16.0, 0.0],
        "w": [5.0, 2.0],
        "clamped_fraction": 0.0,
    },
]


def write_log(path, records):
    path.mkdir(parents=True, exist_ok=True)
    (path / "ppots.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_summary_and_plot_of_the_last_estimate(tmp_path):
    logs = write_log(tmp_path / "stage0_naive" / "logs", RECORDS)
    out = tmp_path / "diag"
    result = CliRunner().invoke(app, ["diag", "ppots", "--log", str(logs.parent), "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["estimates"] == 2 and summary["steps"] == [0, 2]
    assert summary["last"]["proposal_share"] == pytest.approx([5 / 7, 2 / 7])
    assert summary["contrast_over_estimates"] == pytest.approx([5 / 3, 2.5])
    assert (out / "ppots_fit.png").stat().st_size > 0


def test_a_record_without_the_estimate_is_named(tmp_path):
    logs = write_log(tmp_path / "logs", [{"step": 0, "t": [0.5]}])
    with pytest.raises(DiagError, match=r"ppots.jsonl:1: missing field\(s\) m, v, w"):
        diag_ppots(logs, tmp_path / "out")
