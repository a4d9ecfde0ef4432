"""`ray job submit` against a real local cluster: a head started here with `ray start --head`
(dashboard on, token auth on), the Jobs API refusing callers without the token, and a tiny
stage0_naive run submitted as `python ray_jobs/train_stage.py …` that ends with an HF checkpoint.

Independent of the session `ray_cluster` fixture, and nothing here calls `ray.init`: the head runs
in a session of its own, started with its own token file (not ~/.ray/auth_token), and every
process of that session, plus the job driver Ray starts in a session of its own, is stopped by pid
at the end. `ray stop` is not used: it stops every Ray process on the machine, other clusters
included. No working-dir upload either: head and job run on this machine with this venv, so the
entrypoint uses absolute paths and `sys.executable`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from dimoe.config.loader import load_config
from dimoe.config.model import ModelConfig
from dimoe.io import free_ports
from tests.processes import stop_session
from tests.train.blends import write_blends

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
STAGE = "stage0_naive"
START_TIMEOUT_S = 300  # `ray start` with the dashboard takes minutes on a busy 2-core machine
JOB_TIMEOUT_S = 480  # Ray Train + DeepSpeed start-up dominates; slow on a busy 2-core machine
# The head's environment must not point at, or authenticate against, any other cluster.
SCRUBBED = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(JOB_TIMEOUT_S + 2 * START_TIMEOUT_S)]


@dataclass
class Head:
    address: str  # the dashboard / Jobs API URL
    token: str
    temp_dir: Path

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a CLI call; no token unless `extra` passes one."""
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        env.update(extra)
        return env

    def authed_env(self) -> dict[str, str]:
        # The job CLI sends `Authorization: Bearer <token>` only in token mode: RAY_AUTH_TOKEN
        # alone leaves the client in the default (disabled) mode and the request goes out bare.
        return self.env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)

    def job(self, submission_id: str) -> dict:
        """The Jobs REST API's record of a job."""
        request = urllib.request.Request(
            f"{self.address}/api/jobs/{submission_id}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def ray(self, *args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=self.temp_dir
        )


def http_status(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def head():
    # A short root: Ray puts Unix sockets under <temp-dir>/session_*/sockets (~107-char limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr = free_ports(9)
    # RAY_AUTH_MODE stays unset: `ray start --head` turns token auth on by itself when it finds a
    # token, here the cluster's own file rather than the user's ~/.ray/auth_token.
    head_env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    head_env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    cmd = [
        RAY,
        "start",
        "--head",
        f"--port={gcs}",
        f"--dashboard-port={dashboard}",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}",
        "--num-cpus=4",
        f"--object-store-memory={256 * 2**20}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    start_log = temp_dir / "ray-start.log"
    with start_log.open("w") as log:
        proc = subprocess.Popen(
            cmd, env=head_env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    sid = proc.pid  # the session `ray start` leads: GCS, raylet, dashboard and workers stay in it
    try:
        try:
            rc = proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc == 0, f"`ray start --head` exited {rc}:\n{start_log.read_text()[-4000:]}"
        # The documented way to read a cluster's token (it follows RAY_AUTH_TOKEN_PATH).
        printed = subprocess.run(
            [RAY, "get-auth-token"], env=head_env, capture_output=True, text=True, timeout=60
        )
        assert printed.returncode == 0, printed.stderr
        hd = Head(f"http://127.0.0.1:{dashboard}", printed.stdout.strip(), temp_dir)
        assert hd.token == token_file.read_text()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the Jobs API answers once the dashboard's job module is up
            try:
                if http_status(f"{hd.address}/api/jobs/", hd.token) == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the Jobs API did not come up"
            time.sleep(1)
        yield hd
    finally:
        left = stop_session(sid, term_grace_s=5.0)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left behind: {sorted(left)}"


def test_jobs_api_refuses_callers_without_the_token(head):
    jobs = f"{head.address}/api/jobs/"
    assert http_status(jobs) == 401
    assert http_status(jobs, token="0" * 64) == 403
    assert http_status(jobs, token=head.token) == 200
    # The CLI without a token (no RAY_AUTH_TOKEN, client not in token mode) is refused too.
    refused = head.ray(
        "job", "submit", "--address", head.address, "--no-wait", "--", "echo", "never", env=head.env()
    )
    assert refused.returncode != 0
    assert "401" in refused.stdout + refused.stderr or "Authentication" in refused.stdout + refused.stderr
    listed = head.ray("job", "list", "--address", head.address, env=head.authed_env())
    assert listed.returncode == 0, listed.stderr
    assert "never" not in listed.stdout


def test_train_stage_job_writes_a_checkpoint(head, tokenizer, tmp_path):
    tok_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    image_tokens = load_config(ROOT / "configs/model/tiny.yaml", ModelConfig).vision.num_image_tokens
    write_blends(tmp_path / "data", tokenizer, image_tokens)
    out = tmp_path / "out"
    overrides = [
        f"model={ROOT / 'configs/model/tiny.yaml'}",  # relative in the profile; the job's cwd is not ROOT
        f"data.data_dir={tmp_path / 'data'}",
        f"tokenizer={tok_dir}",
        f"output_dir={out}",
        "max_steps=3",
        "log_every=1",
        "batch_size=4",
        "data.response_length=8",
        "checkpoint.every_steps=3",
    ]
    submission_id = f"dimoe-{STAGE}-{uuid.uuid4().hex[:8]}"
    entrypoint = [
        sys.executable,
        str(ROOT / "ray_jobs/train_stage.py"),
        "--stage",
        STAGE,
        "--config",
        str(ROOT / f"configs/train/tiny/{STAGE}.yaml"),
        *(arg for o in overrides for arg in ("--set", o)),
    ]
    started = time.monotonic()
    submit = head.ray(
        "job",
        "submit",
        "--address",
        head.address,
        "--submission-id",
        submission_id,
        "--",
        *entrypoint,
        env=head.authed_env(),
        timeout=JOB_TIMEOUT_S,
    )
    elapsed = time.monotonic() - started
    transcript = (submit.stdout + submit.stderr)[-6000:]
    assert submit.returncode == 0, transcript
    print(f"job {submission_id} finished in {elapsed:.0f} s")

    plain = ("--log-style", "record", "--log-color", "false")
    status = head.ray(
        "job", "status", "--address", head.address, *plain, submission_id, env=head.authed_env()
    )
    assert status.returncode == 0, status.stderr
    assert f"Job '{submission_id}' succeeded" in status.stdout, status.stdout
    assert head.job(submission_id)["status"] == "SUCCEEDED"
    logs = head.ray("job", "logs", "--address", head.address, submission_id, env=head.authed_env())
    # `dimoe train run` ends with its result as JSON: the stage and its final checkpoint
    assert f'"final": "{out / STAGE / "final"}"' in logs.stdout, logs.stdout[-4000:]

    final = out / STAGE / "final"
    assert (final / "model.safetensors").is_file()
    assert json.loads((final / "config.json").read_text())["model_type"]
    metrics = (out / STAGE / "logs/train_metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in metrics]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] > 0 for r in records)
