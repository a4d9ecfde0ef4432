"""lmms-eval's OpenAI-compatible model as a real client of `dimoe infer serve`: the repository's
offline image-question task (dimoe/eval/lmms_eval_tasks/dimoe_demo_vqa) through its CLI, every
request answered. lmms-eval is the `lmms` extra, not part of `dev` (README, "Scoring a served
model"), so this runs where it is installed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dimoe.eval import metrics
from tests.eval.rows import mini_eval_config
from tests.serve.support import API_KEY, MODEL

pytest.importorskip(
    "lmms_eval",
    reason="lmms-eval is the `lmms` extra (pip install -e '.[lmms]'); it is not in `dev` because its "
    "torchvision requirement takes a CUDA wheel here that does not import beside the CPU torch",
)

TASKS = Path(__file__).parents[2] / "dimoe/eval/lmms_eval_tasks"
FAILED = "LMMS_EVAL_REQUEST_FAILED"  # what lmms-eval stores as the answer of a request that failed


@pytest.mark.slow
def test_lmms_eval_openai_model_answers_every_image_question(server, tmp_path):
    config = mini_eval_config(tmp_path)  # DATA/eval/vqa_test.jsonl with images, as `make demo` writes
    data = Path(config.data_root)
    rows = data.joinpath("eval/vqa_test.jsonl").read_text(encoding="utf-8").splitlines()
    workdir = tmp_path / "run"
    (workdir / "artifacts/data/demo/eval").mkdir(parents=True)
    (workdir / "artifacts/data/demo/eval/vqa_test.jsonl").write_text("\n".join(rows) + "\n")
    env = {**os.environ, "DIMOE_DEMO_DATA": str(data), "HF_HOME": str(tmp_path / "hf")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [
        str(Path(sys.executable).parent / "lmms-eval"), "eval", "--model", "openai",
        "--model_args", f"model_version={MODEL},base_url={server.http_url}/v1,api_key={API_KEY}",
        "--include_path", str(TASKS), "--tasks", "dimoe_demo_vqa", "--limit", str(len(rows)),
        "--output_path", "results", "--log_samples",
    ]  # fmt: skip
    run = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"lmms-eval failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"

    (samples_file,) = (workdir / "results").rglob("*samples_dimoe_demo_vqa.jsonl")
    (results_file,) = (workdir / "results").rglob("*results.json")
    samples = [json.loads(line) for line in samples_file.read_text(encoding="utf-8").splitlines()]
    # The scored answer (lmms-eval logs `resps` only where a filter changed it).
    answers = [sample["filtered_resps"] for sample in samples]
    answers = [answer[0] if isinstance(answer, list) else answer for answer in answers]
    # lmms-eval exits 0 even when requests fail: it stores a marker as the answer instead.
    assert len(samples) == len(rows) and not any(FAILED in answer for answer in answers), answers
    golds = [sample["target"] for sample in samples]
    expected = sum(metrics.exact_match(a, g) for a, g in zip(answers, golds, strict=True)) / len(rows)
    score = json.loads(results_file.read_text())["results"]["dimoe_demo_vqa"]["exact_match,none"]
    assert score == pytest.approx(expected)
