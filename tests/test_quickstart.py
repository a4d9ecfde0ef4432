"""`dimoe quickstart --fast` end to end through the real CLI: data, training, eval, diagnostics,
serving; then a re-run skips every finished step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs")
    cmd = [sys.executable, "-m", "dimoe", "quickstart", "--fast", "--root", str(out)]
    env = {**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.timeout(1600)
def test_every_artifact_exists(quickstart):
    out, _ = quickstart
    assert (out / "data/demo/raw/stage3_vision.json").is_file()
    assert (out / "data/v1/normalize_summary.json").is_file()
    assert (out / "models/tiny-siglip/model.safetensors").is_file()
    assert (out / "models/dimoe-vl-tiny/config.json").is_file()  # stage0's init: pretrained tower inside
    for blend in ("stage0_naive", "stage1_align", "stage2_full", "stage3_lownfe"):
        assert list((out / "data/v1/blends" / blend).glob("*.parquet")), blend
        assert (out / "train" / blend / "final/model.safetensors").is_file()
        assert (out / "train" / blend / "logs/train_metrics.jsonl").is_file()
    # The same-budget naive run: stages 2 and 3 from the same stage1 weights, DMAR and EBCMC off.
    for stage in ("stage2_full", "stage3_lownfe"):
        assert (out / "train-naive" / stage / "final/model.safetensors").is_file()
        config = json.loads((out / "train-naive" / stage / "train_config.json").read_text())
        assert config["diffusion"]["views"] == "single" and not config["losses"]["stratified_balance"]
        assert (
            config["max_steps"]
            == json.loads((out / "train" / stage / "train_config.json").read_text())["max_steps"]
        )
    for run in ("final_fast", "final_mid", "final_best", "naive_best"):
        scores = json.loads((out / "eval" / run / "scores.json").read_text())
        assert set(scores["tasks"]) >= {"demo_vqa_colour", "demo_describe"}
    assert (out / "results/summary.md").is_file()
    served = json.loads((out / "quickstart/serve.done").read_text())
    assert isinstance(served["openai_answer"], str) and isinstance(served["grpc_answer"], str)
    assert served["nfe"] >= 1
    for kind in ("routing", "supervision", "gradient"):
        assert (out / "diag" / kind / "summary.json").is_file()
        assert list((out / "diag" / kind).glob("*.png")), kind


def test_rerun_continues_instead_of_starting_over(quickstart):
    out, _ = quickstart
    cmd = [sys.executable, "-m", "dimoe", "quickstart", "--fast", "--root", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from dimoe.quickstart import STEPS

    assert " ".join(proc.stdout.split()).count("done earlier, skipped") == len(STEPS)  # rich wraps lines
