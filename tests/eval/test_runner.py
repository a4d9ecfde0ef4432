"""`run_eval` end to end on a tiny random checkpoint, a demo task file and the local Ray cluster;
`score_file` on its output."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dimoe.cli import app
from dimoe.config.eval import EvalConfig
from dimoe.config.train import TrackingSpec
from dimoe.eval.runner import MissingTaskData, run_eval, score_file
from tests.eval.rows import TINY_PRESETS, mini_eval_config

INFER = TINY_PRESETS


@pytest.fixture
def eval_config(tmp_path: Path) -> EvalConfig:
    return mini_eval_config(tmp_path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_eval_run_with_mlflow_tracking_logs_its_scores(ray_cluster, checkpoint, tmp_path: Path) -> None:
    config = mini_eval_config(tmp_path).model_copy(update={"tracking": TrackingSpec(backend="mlflow")})
    scores = run_eval(config, "mini", "fast", checkpoint, tmp_path / "eval", infer_config=INFER, batch_size=2)
    (run,) = [p for p in (tmp_path / "eval" / "mlruns").glob("*/*") if (p / "metrics").is_dir()]
    logged = (run / "metrics" / "demo_vqa_colour" / "score").read_text().split()
    assert float(logged[1]) == pytest.approx(scores["tasks"]["demo_vqa_colour"]["score"])
    assert (run / "params" / "preset").read_text() == "fast" and (run / "artifacts" / "scores.json").is_file()


def test_run_eval_scores_a_suite_skips_missing_data_and_resumes(
    ray_cluster, checkpoint, eval_config, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    scores = run_eval(eval_config, "mini", "fast", checkpoint, out, infer_config=INFER, batch_size=2)
    assert scores["evaluated"] == ["demo_vqa_colour", "demo_vqa_shape"] and scores["reused"] == []
    assert scores["skipped"] == ["gqa"]
    gqa = scores["tasks"]["gqa"]
    assert (
        gqa["status"] == "skipped"
        and "data file not found" in gqa["reason"]
        and "testdev.json" in gqa["reason"]
    )
    colour = scores["tasks"]["demo_vqa_colour"]
    assert colour["status"] == "done" and colour["n"] == 3 and 0.0 <= colour["score"] <= 1.0
    assert colour["strategy"] == "threshold" and colour["preset"] == "fast"
    assert 1 <= colour["mean_nfe"] <= 2  # 2 steps, one block: at most 2 forwards per request
    assert colour["nfe_x_active_params_b"] == pytest.approx(colour["mean_nfe"] * scores["active_params_b"])
    assert colour["tokens_per_s"] is not None and colour["mean_latency_s"] > 0
    assert json.loads((out / "scores.json").read_text())["tasks"] == scores["tasks"]

    predictions = read_jsonl(out / "demo_vqa_colour/predictions.jsonl")
    assert [row["id"] for row in predictions] == ["c0", "c1", "c2"]
    first = predictions[0]
    assert {"id", "prompt", "output", "prediction", "gold", "score", "nfe", "latency_s"} <= set(first)
    assert first["gold"] == {"answer": "red"} and first["prompt"].startswith("<image>\nWhat colour")
    assert sum(row["score"] for row in predictions) / 3 == pytest.approx(colour["score"])

    again = run_eval(eval_config, "mini", "fast", checkpoint, out, infer_config=INFER, batch_size=2)
    assert again["evaluated"] == [] and again["reused"] == ["demo_vqa_colour", "demo_vqa_shape"]
    assert again["tasks"] == scores["tasks"]

    with pytest.raises(ValueError, match="different run .*settings"):
        run_eval(eval_config, "mini", "best", checkpoint, out, infer_config=INFER)

    rescored = score_file(
        "demo_vqa_colour", out / "demo_vqa_colour/predictions.jsonl", None, tmp_path / "rescored"
    )
    assert rescored["score"] == pytest.approx(colour["score"]) and rescored["n"] == 3
    assert (tmp_path / "rescored/results.jsonl").is_file()


def test_each_task_decodes_its_own_gen_length_and_the_run_override_wins(
    ray_cluster, checkpoint, eval_config, tmp_path: Path
) -> None:
    data = eval_config.model_dump()
    data["tasks"]["demo_vqa_shape"]["gen_length"] = 2
    config = EvalConfig.model_validate(data)
    # batch_size 4: the colour rows and the shape row share a Ray Data batch, decoded per settings.
    mixed = run_eval(config, "mini", "fast", checkpoint, tmp_path / "mixed", infer_config=INFER, batch_size=4)
    shape, colour = mixed["tasks"]["demo_vqa_shape"], mixed["tasks"]["demo_vqa_colour"]
    assert (colour["gen_length"], colour["steps"]) == (8, 2)
    assert (shape["gen_length"], shape["steps"]) == (2, 2)  # the preset's 2-step budget fits 2 tokens
    alone = run_eval(
        eval_config, "demo_vqa_shape", "fast", checkpoint, tmp_path / "alone", infer_config=INFER,
        overrides={"gen_length": 2},
    )  # fmt: skip
    assert alone["settings"]["gen_length"] == 2

    def outputs(run: str, task: str) -> list[str]:
        return [row["output"] for row in read_jsonl(tmp_path / run / task / "predictions.jsonl")]

    shape_outputs = outputs("mixed", "demo_vqa_shape")
    assert shape_outputs == outputs("alone", "demo_vqa_shape")
    assert all(len(output.split()) <= 2 for output in shape_outputs)

    forced = run_eval(
        config, "demo_vqa_shape", "fast", checkpoint, tmp_path / "forced", infer_config=INFER,
        overrides={"gen_length": 8},
    )  # fmt: skip
    assert forced["tasks"]["demo_vqa_shape"]["gen_length"] == 8
    assert outputs("forced", "demo_vqa_shape") != shape_outputs  # the untrained model runs on at 8


def test_a_task_asked_for_alone_fails_on_missing_data(checkpoint, eval_config, tmp_path: Path) -> None:
    with pytest.raises(
        MissingTaskData, match=r"task gqa: data file not found: .*testdev.json; set tasks.gqa.path"
    ):
        run_eval(eval_config, "gqa", "fast", checkpoint, tmp_path / "eval", infer_config=INFER)
    with pytest.raises(ValueError, match="unknown suite or task 'vqa'; suites: mini; tasks: demo_vqa_colour"):
        run_eval(eval_config, "vqa", "fast", checkpoint, tmp_path / "eval", infer_config=INFER)


def test_score_file_takes_infer_outputs_and_ground_truth(eval_config, tmp_path: Path) -> None:
    preds = tmp_path / "preds.jsonl"
    preds.write_text('{"id": "c0", "output": "Red."}\n{"id": "c1", "output": "green"}\n')
    summary = score_file(
        "demo_vqa_colour", preds, Path(eval_config.data_root) / "eval/vqa_test.jsonl", tmp_path / "scored"
    )
    assert summary["score"] == pytest.approx(0.5) and summary["n_gold_without_prediction"] == 1


def test_cli_eval_run_decodes_with_the_given_threshold_and_length(
    ray_cluster, checkpoint, eval_config, tmp_path: Path
) -> None:
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(eval_config.model_dump()))
    out = tmp_path / "eval"
    args = ["eval", "run", "--checkpoint", str(checkpoint), "--out-dir", str(out), "--config", str(config)]
    args += ["--suite", "demo_vqa_shape", "--preset", "fast", "--threshold", "0.55", "--batch-size", "2"]
    args += ["--gen-length", "16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    scores = json.loads((out / "scores.json").read_text())
    assert scores["settings"]["threshold"] == 0.55 and scores["settings"]["strategy"] == "threshold"
    shape = scores["tasks"]["demo_vqa_shape"]
    assert shape["status"] == "done" and (shape["gen_length"], shape["steps"]) == (16, 8)
