"""The command line: one surface for `dimoe …` and the `ray_jobs/` scripts, version, typed errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dimoe import __version__
from dimoe.cli import app, user_errors
from dimoe.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DIMOE = Path(sys.executable).with_name("dimoe")
JOBS = sorted((ROOT / "ray_jobs").glob("*.py"))
ENV = {**os.environ, "COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1"}


def command_path(script: Path) -> list[str]:
    match = re.search(r"run_command\(([^)]*)\)", script.read_text())
    assert match, f"{script} does not run a dimoe command"
    return [part.strip().strip("\"'") for part in match.group(1).split(",")]


def help_text(argv: list[str]) -> str:
    done = subprocess.run(argv + ["--help"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("script", JOBS, ids=[s.name for s in JOBS])
def test_ray_job_scripts_show_exactly_the_dimoe_command_help(script):
    path = command_path(script)
    job_help = help_text([sys.executable, str(script)])
    assert job_help == help_text([str(DIMOE), *path])
    assert f"Usage: dimoe {' '.join(path)} [OPTIONS]" in job_help
    assert "--set" not in job_help or "KEY=VALUE" in job_help


def test_train_commands_take_an_address():
    runner = CliRunner()
    for group in ("run", "all"):
        result = runner.invoke(app, ["train", group, "--help"], env={"COLUMNS": "200"})
        assert "--address" in result.output, result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"dimoe {__version__}"


def test_stage_mismatch_is_one_clear_line(tmp_path):
    result = CliRunner().invoke(
        app,
        ["train", "run", "--config", str(ROOT / "configs/train/tiny/stage1_align.yaml"), "--stage", "stage0"],
    )
    assert result.exit_code == 2
    assert "--stage stage0 does not match" in result.output and "stage1_align" in result.output
    assert "Traceback" not in result.output


def test_only_user_errors_become_one_line():
    """A UserError is the user's to fix: one line, exit 2. A KeyError is a bug: it keeps its traceback."""
    demo = typer.Typer()

    @demo.command()
    @user_errors
    def fail(kind: str) -> None:
        raise UserError("bad input: fix it") if kind == "user" else KeyError("internal")

    runner = CliRunner()
    user = runner.invoke(demo, ["user"])
    assert user.exit_code == 2 and "error: bad input: fix it" in user.output
    bug = runner.invoke(demo, ["bug"])
    assert bug.exit_code == 1 and isinstance(bug.exception, KeyError)


@pytest.mark.parametrize("cache", ["none", "block"])
def test_infer_generate_cache_flag_reaches_the_engine(checkpoint, tmp_path, cache):
    """`--cache` decodes as the engine with that setting (not the preset's `prefix`); the
    block cache is approximate, so it is compared with itself, not with `prefix`."""
    from dimoe.infer.engine import GenerationEngine
    from dimoe.infer.inputs import Request
    from dimoe.io import read_jsonl, write_jsonl

    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"id": "a", "prompt": "What is 2 plus 3?"}])
    argv = ["infer", "generate", "--checkpoint", str(checkpoint), "--input", str(prompts),
            "--out", str(tmp_path / "preds.jsonl"), "--preset", "fast", "--gen-length", "16",
            "--cache", cache]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    (row,) = read_jsonl(tmp_path / "preds.jsonl")
    engine = GenerationEngine.from_checkpoint(checkpoint)
    request = Request("a", prompt="What is 2 plus 3?")
    expected = engine.generate([request], "fast", gen_length=16, cache=cache)[0]
    assert row["output"] == expected.output and row["nfe"] == expected.nfe
    bad = CliRunner().invoke(app, [*argv[:-1], "dual"])
    assert bad.exit_code == 2 and "unknown cache 'dual'" in bad.output
