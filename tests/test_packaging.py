"""The package stands alone: a wheel built from this checkout, installed into a fresh virtual
environment and run from a directory outside the repository, holds its built-in configs and gRPC
stubs, resolves `configs/...` defaults to them, and serves a checkpoint.

Installing torch, Ray and DeepSpeed into the fresh environment would take many minutes, so only the
wheel is installed there (`--no-deps`) and the dependencies come from this environment through
PYTHONPATH. PYTHONPATH entries are not site directories, so their `.pth` files — among them the
editable-install hook that maps `dimoe` to this checkout — are not processed: `import dimoe` can
only find the installed wheel, which the tests assert.
"""

import email.parser
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from dimoe.io import free_ports
from tests.processes import stop_session

ROOT = Path(__file__).resolve().parents[1]
SERVE_TIMEOUT_S = 300  # Ray and Serve start-up on a busy 2-core machine
# The fresh environment must not reach, or authenticate against, another Ray cluster.
SCRUBBED = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "PYTHONHOME")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout, built from a copy of it: building in place would write build/
    and *.egg-info into the repository. No build isolation: this environment's setuptools builds it
    without a download."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "dimoe", source / "dimoe", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(source)])
    (built,) = dist.glob("dimoe-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh(wheel, tmp_path_factory) -> Path:
    """A new virtual environment holding nothing but the wheel (installed by this environment's pip)."""
    env_dir = tmp_path_factory.mktemp("fresh") / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python)]
    run([*pip, "install", "--no-deps", "--no-index", str(wheel)])
    return env_dir


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A working directory outside the repository, with no `configs/` of its own."""
    path = tmp_path_factory.mktemp("elsewhere")
    assert ROOT not in path.parents
    return path


def fresh_env(env_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in SCRUBBED}
    paths = sysconfig.get_paths()
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    env["PATH"] = os.pathsep.join([str(env_dir / "bin"), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = str(env_dir)
    return env


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def test_the_wheel_holds_the_configs_and_the_grpc_stubs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert configs and {f"dimoe/{name}" for name in configs} <= names
    stubs = {f"dimoe/serving/proto/{name}" for name in ("dimoe.proto", "dimoe_pb2.py", "dimoe_pb2_grpc.py")}
    assert stubs <= names
    assert "dimoe/eval/lm_eval_tasks/dimoe_gsm8k.yaml" in names  # lm-eval's --include_path
    assert "dimoe/serving/app.py" in names
    assert {name.split("/")[0] for name in names} == {"dimoe", wheel.name.split("-py3")[0] + ".dist-info"}


def test_this_environment_satisfies_the_wheels_requirements(wheel):
    """Every Requires-Dist of the wheel (the main ones and the dev extra's), and the requirements of
    the extras it asks of its dependencies (ray[serve], ...), hold for the installed versions."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        declared = email.parser.Parser().parsestr(archive.read(metadata).decode()).get_all("Requires-Dist")
    unmet = []
    for line in declared:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": "dev"}):
            unmet += unmet_requirements(requirement)
    assert not unmet, f"not satisfied here: {unmet}"


def unmet_requirements(requirement: Requirement) -> list[str]:
    """`requirement` and what its extras require, each not met by the installed version."""
    try:
        installed = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        return [f"{requirement} (not installed)"]
    met = requirement.specifier.contains(installed, prereleases=True)
    unmet = [] if met else [f"{requirement} ({installed})"]
    for line in importlib.metadata.requires(requirement.name) or []:
        needed = Requirement(line)
        extras = requirement.extras
        if needed.marker is not None and any(needed.marker.evaluate({"extra": e}) for e in extras):
            # The extra's own requirements, one level down (no extras of extras).
            unmet += unmet_requirements(Requirement(f"{needed.name}{needed.specifier}"))
    return unmet


def test_the_installed_cli_resolves_packaged_configs_outside_the_repository(fresh, outside):
    env = fresh_env(fresh)
    where = run(
        [str(fresh / "bin" / "python"), "-c", "import dimoe, dimoe.config.loader as l; "
         "print(dimoe.__file__); print(l.resolve_config_path('configs/train/tiny'))"],
        cwd=outside, env=env,
    ).stdout.split()  # fmt: skip
    assert all(Path(path).is_relative_to(fresh) for path in where), where
    shown = run([str(fresh / "bin" / "dimoe"), "config", "show", "configs/train/tiny/stage2_full.yaml"],
                cwd=outside, env=env).stdout  # fmt: skip
    assert "stage: stage2_full" in shown and "model: configs/model/tiny.yaml" in shown
    missing = subprocess.run([str(fresh / "bin" / "dimoe"), "config", "show", "configs/model/huge.yaml"],
                             cwd=outside, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "configs packaged with dimoe" in missing.stdout + missing.stderr


SERVE_SCRIPT = textwrap.dedent(
    """
    import json, sys, urllib.request

    import grpc
    import ray

    import dimoe
    from dimoe.serving.proto import dimoe_pb2, dimoe_pb2_grpc
    from dimoe.serving.server import start_server_background

    checkpoint, http_port, grpc_port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never another cluster
    server = start_server_background(
        checkpoint, config="configs/serve/default.yaml", http_port=http_port, grpc_port=grpc_port
    )
    try:
        body = {"model": server.config.model_name, "max_tokens": 8, "preset": "fast",
                "messages": [{"role": "user", "content": "What colour is the square?"}]}
        request = urllib.request.Request(
            server.http_url + "/v1/chat/completions", json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        reply = json.load(urllib.request.urlopen(request, timeout=120))
        with grpc.insecure_channel(server.grpc_target) as channel:
            health = dimoe_pb2_grpc.DiMoEStub(channel).Health(dimoe_pb2.HealthRequest(), timeout=60)
        worker_dimoe = ray.get(ray.remote(num_cpus=0)(lambda: __import__("dimoe").__file__).remote())
        result = {"reply": reply, "grpc_health": health.ok, "driver_dimoe": dimoe.__file__,
                  "worker_dimoe": worker_dimoe}
        with open(out, "w") as file:
            json.dump(result, file)
    finally:
        server.stop()
        ray.shutdown()
    """
)


def test_the_installed_package_serves_a_checkpoint(fresh, outside, checkpoint, tmp_path):
    script = outside / "serve_once.py"
    script.write_text(SERVE_SCRIPT)
    out = tmp_path / "result.json"
    ports = [str(port) for port in free_ports(2)]
    cmd = [str(fresh / "bin" / "python"), str(script), str(checkpoint), *ports, str(out)]
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        # A session of its own, so that whatever Ray leaves running is stopped by pid below.
        proc = subprocess.Popen(cmd, cwd=outside, env=fresh_env(fresh), stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            proc.wait(timeout=SERVE_TIMEOUT_S)
        finally:
            stop_session(proc.pid, term_grace_s=5.0)
    assert proc.returncode == 0, f"exited {proc.returncode}:\n{log.read_text()[-6000:]}"
    result = json.loads(out.read_text())
    answer = result["reply"]["choices"][0]
    assert answer["message"]["role"] == "assistant" and answer["finish_reason"] in ("stop", "length")
    assert result["reply"]["dimoe"]["nfe"] > 0 and result["grpc_health"] is True
    for key in ("driver_dimoe", "worker_dimoe"):
        assert Path(result[key]).is_relative_to(fresh), f"{key}: {result[key]} is not the installed wheel"
