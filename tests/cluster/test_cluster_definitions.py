"""Static checks of the cluster definitions under cluster/: KubeRay manifests, the Ray cluster
launcher config, the Slurm batch script and the image. No Ray cluster and no Kubernetes: the
manifests are parsed, cross-checked against each other and against the repository (scripts,
configs and `--set` keys must be real), and the batch script runs against stub Slurm commands."""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dimoe.config.loader import load_config
from dimoe.config.registry import schema_for
from dimoe.config.serve import load_serve_config
from dimoe.config.train import TrainConfig
from dimoe.train.launcher import STAGE_ORDER, load_curriculum

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "launcher" / "dimoe-h800.yaml"
SBATCH = CLUSTER / "slurm" / "dimoe-h800.sbatch"
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"

IMAGE = "dimoe-vl:latest"
APP_DIR = "/opt/dimoe-vl"  # the repository inside the image
SHARED = "/mnt/shared"
CLAIM = "dimoe-shared"
GPUS_PER_NODE = 8
GPU_NODES = 2

EXPECTED_FILES = [
    "docker/Dockerfile",
    "kuberay/shared-storage.yaml",
    "kuberay/raycluster.yaml",
    "kuberay/rayjob-train-stage.yaml",
    "kuberay/rayjob-train-all.yaml",
    "kuberay/rayjob-tune.yaml",
    "kuberay/rayservice.yaml",
    "launcher/dimoe-h800.yaml",
    "slurm/dimoe-h800.sbatch",
    "README.md",
]


@functools.cache
def load_docs(path: Path) -> list[dict[str, Any]]:
    """Parsed documents of a YAML file (cached: treat them as read-only)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # C parser when available: same result
    docs = [doc for doc in yaml.load_all(path.read_text(), Loader=loader) if doc is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def ray_resources() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in load_docs(path):
            if doc.get("apiVersion") == "ray.io/v1":
                found.append((path.name, doc))
    return found


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[doc["kind"]]
    return doc["spec"] if key is None else doc["spec"][key]


def pod_templates(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    pods = [("head", spec["headGroupSpec"]["template"])]
    pods += [(group["groupName"], group["template"]) for group in spec["workerGroupSpecs"]]
    return pods


def in_repo(path: str) -> Path:
    """A path as the cluster sees it (absolute under the image's repository, or relative to its
    working directory) → the same file in this checkout."""
    if path.startswith(APP_DIR + "/"):
        path = path[len(APP_DIR) + 1 :]
    assert not path.startswith("/"), f"{path} is neither relative nor under {APP_DIR}"
    return ROOT / path


def declared_flags(script: Path) -> set[str]:
    """The flags of the `dimoe` command a `ray_jobs/` script runs (`run_command("train", "run")`)."""
    from dimoe.cli import command

    match = re.search(r"run_command\(([^)]*)\)", script.read_text())
    assert match, f"{script} does not run a dimoe command"
    path = [part.strip().strip("\"'") for part in match.group(1).split(",")]
    return {opt for param in command(*path).params for opt in param.opts if opt.startswith("--")}


def parse_entrypoint(entrypoint: str) -> tuple[str, argparse.Namespace, list[str]]:
    """`python SCRIPT --flag value ... --set k=v ...` → (script, known flags, flags used)."""
    tokens = shlex.split(entrypoint)
    assert tokens[0] == "python", entrypoint
    script = tokens[1]
    parser = argparse.ArgumentParser()
    for flag in ("--stage", "--config", "--config-dir", "--variants"):
        parser.add_argument(flag)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args, unknown = parser.parse_known_args(tokens[2:])
    assert not unknown, f"unexpected arguments {unknown} in {entrypoint!r}"
    used = [t.split("=", 1)[0] for t in tokens[2:] if t.startswith("--")]
    return script, args, used


def ray_version_of_image() -> str:
    match = re.search(r"^ARG RAY_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert match, "cluster/docker/Dockerfile pins no RAY_VERSION"
    return match.group(1)


# --- every file ---------------------------------------------------------------------------------


def test_expected_files_exist():
    missing = [name for name in EXPECTED_FILES if not (CLUSTER / name).is_file()]
    assert not missing, f"missing under cluster/: {missing}"


@pytest.mark.parametrize(
    "path", sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml")), ids=lambda p: p.name
)
def test_every_yaml_parses(path):
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"


# --- KubeRay ------------------------------------------------------------------------------------


def test_kuberay_documents_have_kubernetes_shape():
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in load_docs(path):
            for key in ("apiVersion", "kind", "metadata", "spec"):
                assert key in doc, f"{path.name}: {doc.get('kind')} lacks {key}"
            assert doc["metadata"].get("name"), f"{path.name}: {doc['kind']} has no metadata.name"


def test_ray_resource_kinds():
    kinds = sorted(doc["kind"] for _, doc in ray_resources())
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayJob", "RayService"]


def test_shared_claim_is_read_write_many():
    (claim,) = load_docs(KUBERAY / "shared-storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["metadata"]["name"] == CLAIM
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("name,doc", ray_resources(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_cluster_shape(name, doc):
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray_version_of_image(), f"{name}: rayVersion differs from the image"
    assert spec["authOptions"] == {"mode": "token"}, f"{name}: Ray token auth is off"

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (head_container,) = head["template"]["spec"]["containers"]
    for section in ("requests", "limits"):
        assert "nvidia.com/gpu" not in head_container["resources"][section], f"{name}: the head has GPUs"

    (workers,) = spec["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == GPU_NODES
    assert workers["rayStartParams"]["num-gpus"] == str(GPUS_PER_NODE)
    (worker,) = workers["template"]["spec"]["containers"]
    for section in ("requests", "limits"):
        assert int(worker["resources"][section]["nvidia.com/gpu"]) == GPUS_PER_NODE, f"{name}: {section}"
    tolerated = {t["key"] for t in workers["template"]["spec"].get("tolerations", [])}
    assert "nvidia.com/gpu" in tolerated
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert "NCCL_SOCKET_IFNAME" in env and "NCCL_IB_HCA" in env

    for group, params in (("head", head["rayStartParams"]), ("workers", workers["rayStartParams"])):
        pod = head if group == "head" else workers
        annotations = pod["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == params["metrics-export-port"], f"{name}: {group}"


def test_gpu_count_matches_the_training_configs():
    configs = load_curriculum(ROOT / "configs" / "train")
    assert [c.stage for c in configs] == list(STAGE_ORDER)
    worker_cpus = {}
    for name, doc in ray_resources():
        (workers,) = cluster_spec(doc)["workerGroupSpecs"]
        (worker,) = workers["template"]["spec"]["containers"]
        worker_cpus[name] = float(worker["resources"]["limits"]["cpu"])
    for cfg in configs:
        assert cfg.scaling.use_gpu
        assert cfg.scaling.num_workers == GPU_NODES * GPUS_PER_NODE, cfg.stage
        # a GPU pod holds GPUS_PER_NODE train workers, each reserving cpus_per_worker CPUs
        for name, cpus in worker_cpus.items():
            assert cpus >= GPUS_PER_NODE * cfg.scaling.cpus_per_worker, (
                f"{name}: too few CPUs for {cfg.stage}"
            )


@pytest.mark.parametrize("name,doc", ray_resources(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_every_pod_mounts_shared_storage_shm_and_ray_tmp(name, doc):
    dockerfile = DOCKERFILE.read_text()
    assert re.search(rf"^WORKDIR {re.escape(APP_DIR)}$", dockerfile, re.M)
    for group, template in pod_templates(cluster_spec(doc)):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        claims = {
            n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == CLAIM
        }
        assert claims, f"{name}/{group}: no volume of the claim {CLAIM}"
        for container in template["spec"]["containers"]:
            where = f"{name}/{group}/{container['name']}"
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get(SHARED) in claims, f"{where}: {SHARED} is not the shared claim"
            shm = volumes[mounts["/dev/shm"]]["emptyDir"]
            assert shm["medium"] == "Memory", f"{where}: /dev/shm is not memory-backed"
            assert "emptyDir" in volumes[mounts["/tmp/ray"]], f"{where}: /tmp/ray is not an emptyDir"
            assert container["image"] == IMAGE
            assert container["workingDir"] == APP_DIR, f"{where}: relative entrypoints need {APP_DIR}"


RAYJOBS = [(name, doc) for name, doc in ray_resources() if doc["kind"] == "RayJob"]


@pytest.mark.parametrize("name,doc", RAYJOBS, ids=[name for name, _ in RAYJOBS])
def test_rayjob_lifecycle(name, doc):
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    # KubeRay pastes the entrypoint into the submitter's shell command line: no shell operators.
    assert not re.search(r"&&|\|\||[;|<>`$]", spec["entrypoint"]), spec["entrypoint"]


def on_shared(path: str | None) -> bool:
    return bool(path) and path.startswith(SHARED + "/")


@pytest.mark.parametrize("name,doc", RAYJOBS, ids=[name for name, _ in RAYJOBS])
def test_rayjob_entrypoint_runs_real_scripts_and_flags(name, doc):
    script, args, used = parse_entrypoint(doc["spec"]["entrypoint"])
    assert (ROOT / script).is_file(), f"{name}: {script} does not exist"
    undeclared = set(used) - declared_flags(ROOT / script)
    assert not undeclared, f"{name}: {script} has no {sorted(undeclared)}"
    config = args.config or args.config_dir
    assert config and in_repo(config).exists(), f"{name}: {config} does not exist"


def test_rayjob_train_stage_config_and_storage():
    (doc,) = [d for n, d in RAYJOBS if n == "rayjob-train-stage.yaml"]
    script, args, _ = parse_entrypoint(doc["spec"]["entrypoint"])
    assert script == "ray_jobs/train_stage.py"
    cfg = load_config(in_repo(args.config), TrainConfig, args.overrides)  # unknown --set keys raise
    assert cfg.stage == args.stage
    assert on_shared(cfg.output_dir) and on_shared(cfg.data.data_dir) and on_shared(cfg.init_from)


def test_rayjob_train_all_configs_and_storage():
    (doc,) = [d for n, d in RAYJOBS if n == "rayjob-train-all.yaml"]
    script, args, _ = parse_entrypoint(doc["spec"]["entrypoint"])
    assert script == "ray_jobs/train_all_stages.py"
    configs = load_curriculum(in_repo(args.config_dir), args.overrides)
    assert [c.stage for c in configs] == list(STAGE_ORDER)
    for cfg in configs:
        assert on_shared(cfg.output_dir) and on_shared(cfg.data.data_dir) and on_shared(cfg.init_from)


def test_rayjob_tune_grid_resolves_on_shared_storage(monkeypatch):
    from dimoe.config.eval import EvalConfig
    from dimoe.tune.ablations import experiment_dir, trial_stage_configs, validate_grid

    (doc,) = [d for n, d in RAYJOBS if n == "rayjob-tune.yaml"]
    script, args, _ = parse_entrypoint(doc["spec"]["entrypoint"])
    assert script == "ray_jobs/tune_ablations.py"
    monkeypatch.chdir(ROOT)  # the pods run from the repository root (workingDir)
    cfg = load_config(args.config, schema_for(in_repo(args.config)), args.overrides)
    assert on_shared(cfg.storage_path)
    variants = cfg.selected(list(cfg.run) + list(cfg.groups))
    validate_grid(cfg, variants)  # every trial's stage configs and the eval config resolve
    for variant in variants:
        trial_dir = experiment_dir(cfg) / "trials" / f"{variant}-s0"
        stages = trial_stage_configs(cfg, variant, 0, trial_dir)
        trial_gpus = stages[0].scaling.num_workers
        assert cfg.max_concurrent_trials * trial_gpus <= GPU_NODES * GPUS_PER_NODE, "trials cannot fit"
        for stage in stages:
            assert stage.scaling.use_gpu and stage.model.endswith("llada_moe_7b_siglip.yaml"), variant
            assert on_shared(stage.output_dir) and on_shared(stage.data.data_dir), variant
            assert on_shared(stage.init_from), variant
    eval_cfg = load_config(cfg.eval.config, EvalConfig, cfg.eval.set)
    assert on_shared(eval_cfg.data_root)


def serve_config() -> tuple[dict[str, Any], dict[str, Any]]:
    ((_, service),) = [(n, d) for n, d in ray_resources() if d["kind"] == "RayService"]
    raw = service["spec"]["serveConfigV2"]
    assert isinstance(raw, str), "serveConfigV2 must be a YAML string"
    return service, yaml.safe_load(raw)


def defined_functions(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}


def test_rayservice_import_path_and_grpc_servicers_resolve():
    _, config = serve_config()
    (app,) = config["applications"]
    module, attr = app["import_path"].split(":")
    module_file = ROOT / (module.replace(".", "/") + ".py")
    assert module_file.is_file(), f"{app['import_path']}: {module_file} does not exist"
    assert attr in defined_functions(module_file)
    for dotted in config["grpc_options"]["grpc_servicer_functions"]:
        module, _, function = dotted.rpartition(".")
        path = ROOT / (module.replace(".", "/") + ".py")
        assert path.is_file() and function in defined_functions(path), dotted
    # the same application as the repository's config-as-code
    local = yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text())
    assert app["import_path"] == local["applications"][0]["import_path"]
    assert (
        config["grpc_options"]["grpc_servicer_functions"] == local["grpc_options"]["grpc_servicer_functions"]
    )


def test_rayservice_ports_gpus_and_app_args():
    service, config = serve_config()
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert config["grpc_options"]["port"] == 9000
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {8000, 9000} <= {p["containerPort"] for p in head["ports"]}

    (app,) = config["applications"]
    deployment_names = set(re.findall(r'@serve\.deployment\(name="(\w+)"\)', _serve_sources()))
    by_name = {d["name"]: d for d in app["deployments"]}
    assert set(by_name) <= deployment_names, f"unknown deployments {set(by_name) - deployment_names}"
    assert by_name["Decoder"]["ray_actor_options"]["num_gpus"] == 1

    args = dict(app["args"])
    path = in_repo(args.pop("config"))
    args["infer_config"] = str(in_repo(args["infer_config"]))
    cfg = load_serve_config(path, [], **args)  # the application's own schema accepts every arg
    assert cfg.decoder.device == "cuda"
    assert cfg.checkpoint.startswith(SHARED + "/")
    gpus = GPU_NODES * GPUS_PER_NODE
    replicas = cfg.decoder.autoscaling.max_replicas if cfg.decoder.autoscaling else cfg.decoder.num_replicas
    assert replicas * by_name["Decoder"]["ray_actor_options"]["num_gpus"] <= gpus
    assert cfg.decoder.num_cpus == by_name["Decoder"]["ray_actor_options"]["num_cpus"]


def _serve_sources() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "dimoe" / "serving").glob("*.py"))


# --- Ray cluster launcher -----------------------------------------------------------------------


def test_launcher_config():
    config = yaml.safe_load(LAUNCHER.read_text())
    assert config["cluster_name"]
    provider = config["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"] and len(provider["worker_ips"]) == GPU_NODES
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head and "--num-gpus=0" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in workers
    assert f"--num-gpus={GPUS_PER_NODE}" in workers
    docker = config["docker"]
    assert docker["image"] == IMAGE
    assert f"-v {SHARED}:{SHARED}" in docker["run_options"]
    assert "-e RAY_AUTH_MODE=token" in docker["run_options"]
    assert list(config["file_mounts"]) == [APP_DIR]


def test_launcher_config_passes_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")  # locates the package without importing Ray
    assert spec is not None and spec.submodule_search_locations
    schema_file = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_file.read_text())
    config = yaml.safe_load(LAUNCHER.read_text())
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as exc:
        pytest.fail(f"{LAUNCHER.name}: {exc.message} at {list(exc.absolute_path)}")


# --- Slurm --------------------------------------------------------------------------------------


def sbatch_directives() -> dict[str, str]:
    directives = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH"):
            key, _, value = line.split(maxsplit=1)[1].partition("=")
            directives[key] = value
        elif line.strip() and not line.startswith("#"):
            break  # sbatch stops reading directives at the first command
    return directives


def test_sbatch_directives_and_syntax():
    directives = sbatch_directives()
    assert directives["--nodes"] == str(GPU_NODES)
    assert directives["--gres"] == f"gpu:{GPUS_PER_NODE}"
    assert directives["--ntasks-per-node"] == "1"
    text = SBATCH.read_text()
    assert "ray symmetric-run --address" in text
    assert (ROOT / "ray_jobs" / "train_stage.py").is_file() and "ray_jobs/train_stage.py" in text
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_sbatch(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str], dict[str, str]]:
    """Run the batch script with stub `srun`/`scontrol`; return the srun argv that starts Ray."""
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    bin_dir.mkdir()
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    log, env_log = tmp_path / "srun.args", tmp_path / "srun.env"
    _stub(bin_dir, "scontrol", 'printf "gpu001\\ngpu002\\n"\n')
    _stub(
        bin_dir,
        "srun",
        'if [[ " $* " == *" hostname "* ]]; then echo "10.0.0.1 fe80::1"; exit 0; fi\n'
        f'printf "%s\\n" "$@" > "{log}"\n'
        f'env | grep "^RAY_AUTH" > "{env_log}"\n',
    )
    full_env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu[001-002]",
        "SLURM_CPUS_ON_NODE": "192",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SHARED_DIR": str(tmp_path / "shared"),
        "VENV": str(venv),
        **env,
    }
    for key in ("STAGE", "CONFIG", "INIT_FROM", "OUTPUT_DIR", "DATA_DIR", "HEAD_IP", "RAY_AUTH_TOKEN"):
        if key not in env:
            full_env.pop(key, None)
    result = subprocess.run(["bash", str(SBATCH)], env=full_env, capture_output=True, text=True, timeout=30)
    argv = log.read_text().splitlines() if log.exists() else []
    seen = dict(line.split("=", 1) for line in env_log.read_text().splitlines()) if env_log.exists() else {}
    return result, argv, seen


def test_sbatch_starts_ray_everywhere_and_trains_the_stage(tmp_path):
    result, argv, env = run_sbatch(tmp_path)
    assert result.returncode == 0, result.stderr
    shared = tmp_path / "shared"
    assert f"--nodes={GPU_NODES}" in argv
    assert f"--gres=gpu:{GPUS_PER_NODE}" in argv
    start = argv.index("ray")
    assert argv[start : start + 4] == ["ray", "symmetric-run", "--address", "10.0.0.1:6379"]
    ray_args, entrypoint = argv[start + 4 : argv.index("--")], argv[argv.index("--") + 1 :]
    assert "--min-nodes" in ray_args and f"--num-gpus={GPUS_PER_NODE}" in ray_args
    script, args, _ = parse_entrypoint(shlex.join(entrypoint))
    assert (ROOT / script).is_file()
    assert args.stage == "stage2_full" and args.config == "configs/train/stage2_full.yaml"
    cfg = load_config(ROOT / args.config, TrainConfig, args.overrides)
    assert cfg.output_dir == f"{shared}/artifacts/train"
    assert cfg.data.data_dir == f"{shared}/artifacts/data/v1"
    assert cfg.init_from == f"{shared}/artifacts/train/stage1_align/final"
    assert (shared / "artifacts" / "train").is_dir()
    assert env["RAY_AUTH_MODE"] == "token"
    assert re.fullmatch(r"[0-9a-f]{64}", env["RAY_AUTH_TOKEN"])


def test_sbatch_stage0_starts_from_the_assembled_model(tmp_path):
    result, argv, _ = run_sbatch(tmp_path, STAGE="stage0_naive")
    assert result.returncode == 0, result.stderr
    assert "configs/train/stage0_naive.yaml" in argv
    assert f"init_from={tmp_path}/shared/artifacts/models/dimoe-vl-7b" in argv


def test_sbatch_refuses_an_unknown_stage_without_init_from(tmp_path):
    result, argv, _ = run_sbatch(tmp_path, STAGE="stage9", CONFIG="configs/train/stage2_full.yaml")
    assert result.returncode == 2
    assert "INIT_FROM" in result.stderr
    assert argv == []


# --- README arithmetic follows the configs --------------------------------------------------------


def test_readme_tokens_per_step_matches_the_configs():
    cfg = load_config(ROOT / "configs" / "train" / "stage2_full.yaml", TrainConfig)
    views = 2 if cfg.diffusion.views != "single" else 1
    samples = cfg.batch_size * cfg.grad_accum * cfg.scaling.num_workers
    tokens = samples * views * 512  # the README's assumed padded row length
    readme = (CLUSTER / "README.md").read_text()
    assert f"{samples} samples × {views} views × 512 = {tokens:,} tokens" in readme
