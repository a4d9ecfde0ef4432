"""The training gauges reach a real Prometheus run with the shipped cluster/prometheus/prometheus.yml:
a tiny training run on its own local Ray cluster (with its dashboard, which writes the service-
discovery file), scraped through that file every second, and the Grafana dashboard's queries
answer for the cluster label the config sets.

Own cluster, in a subprocess: the session `ray_cluster` fixture has no dashboard, and a driver
process can only `ray.init` once. Both subprocesses run in sessions of their own and every process
of those sessions is stopped by pid at the end."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from dimoe.config.loader import load_config
from dimoe.config.model import ModelConfig
from dimoe.dashboards.grafana import build_dashboard
from dimoe.io import free_ports
from dimoe.telemetry.catalogue import TRAINING_METRICS
from tests.processes import stop_session
from tests.train.blends import write_blends

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = ROOT / "cluster/prometheus/prometheus.yml"
DISCOVERY_FILE = "prom_metrics_service_discovery.json"
CLUSTER_LABEL = "dimoe"  # the ray_io_cluster the shipped config gives its targets
PROMETHEUS = shutil.which("prometheus")
STAGE = "stage0_naive"
TRAIN_TIMEOUT_S = 900  # Ray + TorchTrainer + DeepSpeed start-up dominates; slow on a busy 2-core box
SERIES_TIMEOUT_S = 60

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="no `prometheus` binary on PATH (Debian: apt-get install prometheus; `make setup` tries it)",
    ),
]

TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys

    import ray

    from dimoe.config.loader import load_config
    from dimoe.config.train import TrainConfig
    from dimoe.train.launcher import run_stage

    temp_dir, dashboard_port, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    # address="local": a new cluster even if another one runs on this machine. The dashboard
    # writes TEMP_DIR/prom_metrics_service_discovery.json, which Prometheus reads.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        dashboard_port=dashboard_port,
        _temp_dir=temp_dir,
        object_store_memory=256 * 2**20,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    run_stage(load_config("configs/train/tiny/stage0_naive.yaml", TrainConfig, overrides))
    print("TRAINED", flush=True)
    ray.shutdown()
    """
)


def stop_leader_session(proc: subprocess.Popen) -> None:
    proc.poll()  # reap the leader
    stop_session(proc.pid, term_grace_s=20.0)


@contextmanager
def own_session(cmd: list[str], log: Path, **kwargs):
    """A subprocess in a new session, stopped with everything it started (Ray's GCS, raylet and
    workers included) when the block ends, whatever happened in it."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        stop_leader_session(proc)


def prometheus_get(base: str, path: str, **params: str) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def series(base: str, metric: str) -> list[dict]:
    return prometheus_get(base, "/api/v1/series", **{"match[]": f'{metric}{{stage="{STAGE}"}}'})["data"]


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def train_command(
    tmp_path: Path, tokenizer, spec: ModelConfig, ray_dir: Path, dashboard_port: int
) -> list[str]:
    """A 4-step two-view stage0 run on tiny blends, logging (and publishing gauges) every step."""
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    write_blends(tmp_path / "data", tokenizer, spec.vision.num_image_tokens)
    overrides = [
        f"data.data_dir={tmp_path / 'data'}",
        f"tokenizer={tmp_path / 'tokenizer'}",
        f"output_dir={tmp_path / 'out'}",
        "max_steps=4",
        "log_every=1",
        "batch_size=4",
        "data.response_length=8",
        "data.shuffle_buffer=0",
        "diffusion.views=complementary",  # two views: the view-consistency gauge is set too
        "scaling.num_workers=1",
        "checkpoint.every_steps=100",
    ]
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT)
    return [sys.executable, str(tmp_path / "train.py"), str(ray_dir), str(dashboard_port), *overrides]


def prometheus_command(tmp_path: Path, ray_dir: Path, prometheus_port: int) -> list[str]:
    """A Prometheus with the shipped config, its discovery file the one of this test's Ray
    (`ray_dir`) and its timings shortened to a second, so a 4-step run is seen."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = config["scrape_configs"]
    (discovery,) = job["file_sd_configs"]
    assert discovery["files"] == [f"/tmp/ray/{DISCOVERY_FILE}"], "the file Ray writes by default"
    discovery.update(files=[str(ray_dir / DISCOVERY_FILE)], refresh_interval="1s")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    config = tmp_path / "prometheus.yml"
    return [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
    ]


def wait_ready(prom_url: str, prometheus: subprocess.Popen, prom_log: Path) -> None:
    """Prometheus up before training starts, so no published value is missed."""
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{prom_url}/-/ready", timeout=2).close()
            return
        except OSError:
            assert prometheus.poll() is None, f"prometheus exited:\n{tail(prom_log)}"
            assert time.monotonic() < deadline, f"prometheus not ready in 30 s:\n{tail(prom_log)}"
            time.sleep(0.5)


def collect_series(
    prom_url: str, training: subprocess.Popen, train_log: Path, wanted: dict[str, set[str]]
) -> dict[str, list[dict]]:
    """The series of each wanted metric, polled until all appear or training ended a while ago."""
    found: dict[str, list[dict]] = {}
    started, finished_at = time.monotonic(), None
    while len(found) < len(wanted):
        for metric in wanted.keys() - found.keys():
            if data := series(prom_url, metric):
                found[metric] = data
        if finished_at is None and training.poll() is not None:
            finished_at = time.monotonic()
            assert training.returncode == 0, f"training failed:\n{tail(train_log)}"
        now = time.monotonic()
        if (finished_at and now - finished_at > SERIES_TIMEOUT_S) or now - started > TRAIN_TIMEOUT_S:
            break
        time.sleep(1)
    training.wait(TRAIN_TIMEOUT_S - (time.monotonic() - started))
    assert training.returncode == 0, f"training failed:\n{tail(train_log)}"
    return found


def check_scraped_values(prom_url: str, found: dict[str, list[dict]], spec: ModelConfig) -> None:
    """Every layer and expert reported; each layer's loads sum to 1; JS divergence in [0, 1]."""
    layers = {str(i) for i in range(spec.num_hidden_layers)}
    experts = {str(i) for i in range(spec.num_experts)}
    assert {(s["layer"], s["expert"]) for s in found["ray_dimoe_expert_load"]} == {
        (layer, expert) for layer in layers for expert in experts
    }
    for metric in (
        "ray_dimoe_router_entropy",
        "ray_dimoe_view_consistency",
        "ray_dimoe_routing_nonstationarity",
    ):
        assert {s["layer"] for s in found[metric]} == layers, metric
    assert {"loss", "loss_diffusion"} <= {s["term"] for s in found["ray_dimoe_train_loss"]}

    def last_values(query: str) -> dict[str, float]:
        result = prometheus_get(prom_url, "/api/v1/query", query=query)["data"]["result"]
        return {r["metric"].get("layer", ""): float(r["value"][1]) for r in result}

    load_sums = last_values(f'sum by (layer) (last_over_time(ray_dimoe_expert_load{{stage="{STAGE}"}}[10m]))')
    assert set(load_sums) == layers and all(abs(v - 1.0) < 1e-3 for v in load_sums.values()), load_sums
    js = last_values(f'last_over_time(ray_dimoe_routing_nonstationarity{{stage="{STAGE}"}}[10m])')
    assert set(js) == layers and all(0.0 <= v <= 1.0 for v in js.values()), js


def check_dashboard_query(prom_url: str, spec: ModelConfig) -> None:
    """The dashboard's expert-load query, its variables set as Grafana would, finds every layer's
    experts in this cluster and nothing in another one."""
    panel = next(p for p in build_dashboard()["panels"] if p["title"].startswith("Expert load"))
    expr = panel["targets"][0]["expr"].replace("$stage", STAGE).replace("$layer", ".*")

    def count(cluster: str) -> int:
        query = f"last_over_time({expr.replace('$cluster', cluster)}[10m])"
        return len(prometheus_get(prom_url, "/api/v1/query", query=query)["data"]["result"])

    assert count(CLUSTER_LABEL) == spec.num_hidden_layers * spec.num_experts
    assert count("another-cluster") == 0


def test_training_gauges_are_scraped_by_prometheus(tokenizer, tmp_path):
    spec = load_config(ROOT / "configs/model/tiny.yaml", ModelConfig)
    dashboard_port, prometheus_port = free_ports(2)
    prom_url = f"http://127.0.0.1:{prometheus_port}"
    # Short: Ray's socket paths under it must stay within the OS limit of about 107 characters.
    ray_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    train_cmd = train_command(tmp_path, tokenizer, spec, ray_dir, dashboard_port)
    prometheus_cmd = prometheus_command(tmp_path, ray_dir, prometheus_port)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_metrics_report_interval_ms"] = "1000"  # workers push gauges every second (default 10 s)
    prom_log, train_log = tmp_path / "prometheus.log", tmp_path / "train.log"
    # Every training metric of the catalogue, with the tags it is declared with.
    wanted = {metric.series[0]: set(metric.tag_keys) for metric in TRAINING_METRICS}

    try:
        with own_session(prometheus_cmd, prom_log, cwd=tmp_path) as prometheus:
            wait_ready(prom_url, prometheus, prom_log)
            with own_session(train_cmd, train_log, cwd=ROOT, env=env) as training:
                found = collect_series(prom_url, training, train_log, wanted)
            targets = prometheus_get(prom_url, "/api/v1/targets")["data"]["activeTargets"]
            missing = sorted(wanted.keys() - found.keys())
            assert not missing, (
                f"no series for {missing} in Prometheus; scrape targets: "
                f"{[(t['scrapeUrl'], t['health'], t.get('lastError')) for t in targets]}\n"
                f"training log:\n{tail(train_log)}"
            )
            # The targets came from Ray's discovery file, and carry the config's cluster label.
            assert targets and {t["discoveredLabels"].get("__meta_filepath") for t in targets} == {
                str(ray_dir / DISCOVERY_FILE)
            }
            for metric, labels in wanted.items():
                for entry in found[metric]:
                    assert entry["stage"] == STAGE and labels <= entry.keys(), (metric, entry)
                    assert entry["ray_io_cluster"] == CLUSTER_LABEL, (metric, entry)
            check_scraped_values(prom_url, found, spec)
            check_dashboard_query(prom_url, spec)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
