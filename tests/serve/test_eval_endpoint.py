"""`dimoe eval run --serve-url`: the same suite scored through the running server gives the files,
outputs and scores of the in-process run on the same checkpoint."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dimoe.cli import app
from dimoe.errors import UserError
from dimoe.eval.endpoint import Endpoint
from dimoe.eval.runner import run_eval
from tests.eval.rows import TINY_PRESETS, mini_eval_config
from tests.serve.support import API_KEY, MODEL

COMPARED = ("id", "prompt", "output", "prediction", "gold", "score", "nfe")


def predictions(out: Path, task: str) -> list[dict]:
    lines = (out / task / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [{key: json.loads(line)[key] for key in COMPARED} for line in lines]


def test_cli_eval_through_the_server_matches_the_in_process_run(server, checkpoint, tmp_path):
    config = mini_eval_config(tmp_path)
    local = run_eval(config, "mini", "fast", checkpoint, tmp_path / "local", infer_config=TINY_PRESETS)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config.model_dump()))
    (tmp_path / "infer.yaml").write_text(yaml.safe_dump(TINY_PRESETS.model_dump()))
    out = tmp_path / "served"
    args = ["eval", "run", "--serve-url", server.http_url, "--api-key", API_KEY, "--out-dir", str(out)]
    args += ["--config", str(tmp_path / "eval.yaml"), "--infer-config", str(tmp_path / "infer.yaml")]
    args += ["--suite", "mini", "--preset", "fast", "--concurrency", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    served = json.loads((out / "scores.json").read_text())
    assert served["serve_url"] == server.http_url and served["model"] == MODEL
    assert served["active_params_b"] == pytest.approx(local["active_params_b"])
    assert served["settings"] == local["settings"]
    for task in local["evaluated"]:
        assert predictions(out, task) == predictions(tmp_path / "local", task)
        for metric in ("score", "n", "mean_nfe"):
            assert served["tasks"][task][metric] == local["tasks"][task][metric]
    assert served["tasks"]["gqa"]["status"] == "skipped"

    again = CliRunner().invoke(app, args)  # finished tasks are reused, not sent again
    assert again.exit_code == 0, again.output
    assert '"reused": [\n    "demo_vqa_colour",\n    "demo_vqa_shape"\n  ]' in again.output


def test_endpoint_errors_name_the_server_and_the_fix(server):
    with pytest.raises(UserError, match="answered 401"):
        Endpoint(server.http_url, api_key="wrong").info()
    with pytest.raises(UserError, match=r"cannot reach the server at http://127.0.0.1:9.*dimoe infer serve"):
        Endpoint("http://127.0.0.1:9").info()
