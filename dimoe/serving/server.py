"""Start the Ray Serve application of `serve/` (docs/design.md §6) from Python or the CLI.

    server = start_server_background("artifacts/train/stage3_lownfe/final", http_port=8000)
    print(server.http_url)   # http://127.0.0.1:8000 — OpenAI clients use base_url=server.http_url + "/v1"
    server.stop()

`start_server` is the blocking form behind `dimoe infer serve`. Both build the application through
its import path, `serve.app:build_app`, exactly as `serve run serve/serve_config.yaml` does, so
there is one way to assemble it (and the library does not import the `serve/` shell).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from dimoe.config.infer import InferConfig
from dimoe.config.loader import load_config
from dimoe.config.serve import ServeConfig, load_serve_config
from dimoe.serving.http import api_key_digest

APP_BUILDER = "serve.app:build_app"
GRPC_STUBS = "serve.proto"
GRPC_SERVICER = f"{GRPC_STUBS}.dimoe_pb2_grpc.add_DiMoEServicer_to_server"
# The directory holding `serve/`: the driver imports the application builder from it, Serve's proxy
# the gRPC servicer, the benchmark actor the gRPC stubs.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class DeploymentPlan:
    """Options and constructor arguments of the two deployments."""

    decoder_options: dict[str, Any]
    decoder_args: dict[str, Any]
    ingress_options: dict[str, Any]
    ingress_args: dict[str, Any]


def serve_config_from_args(args: dict[str, Any]) -> ServeConfig:
    """The `args:` of `serve.app:build_app`: ServeConfig keys, plus optionally `config` (a
    configs/serve/*.yaml the keys override) and `set` (a list of `a.b=value` overrides)."""
    fields = dict(args)
    path = fields.pop("config", None)
    overrides = fields.pop("set", None) or []
    return load_serve_config(path, overrides, **fields)


def deployment_plan(config: ServeConfig) -> DeploymentPlan:
    """Check the checkpoint and the infer config here, on the driver, so that a mistake is one clear
    error instead of replicas failing to start; paths are made absolute for the replicas."""
    if config.checkpoint is None:
        raise ValueError(
            "no checkpoint to serve: pass --checkpoint DIR or set `checkpoint` in the serve config"
        )
    checkpoint = Path(config.checkpoint).expanduser().resolve()
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} has no config.json")
    infer = load_config(config.infer_config, InferConfig)
    decoder, batching = config.decoder, config.batching
    decoder_options: dict[str, Any] = {
        "max_ongoing_requests": config.decoder_max_ongoing_requests,
        "max_queued_requests": decoder.max_queued_requests,
        "ray_actor_options": {"num_cpus": decoder.num_cpus},
    }
    if decoder.autoscaling is not None:
        scaling = decoder.autoscaling
        decoder_options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests or batching.max_batch_size,
        }
    else:
        decoder_options["num_replicas"] = decoder.num_replicas
    ingress = config.ingress
    return DeploymentPlan(
        decoder_options=decoder_options,
        decoder_args={
            "checkpoint": str(checkpoint),
            "infer_config": infer.model_dump(),
            "max_batch_size": batching.max_batch_size,
            "batch_wait_timeout_s": batching.batch_wait_timeout_s,
            "torch_threads": decoder.torch_threads or max(1, int(decoder.num_cpus)),
            "device": decoder.device,
        },
        ingress_options={
            "num_replicas": ingress.num_replicas,
            "max_ongoing_requests": ingress.max_ongoing_requests,
            "max_queued_requests": ingress.max_queued_requests,
            "ray_actor_options": {"num_cpus": ingress.num_cpus},
        },
        ingress_args={
            "model_name": config.model_name,
            "limits": config.limits.model_dump(),
            "api_key_sha256": api_key_digest(config.api_key),
        },
    )


@dataclass
class RunningServer:
    """A started application; `stop()` shuts Serve down (and Ray, if this server started it)."""

    config: ServeConfig
    owns_ray: bool

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.config.http_port}"

    @property
    def grpc_target(self) -> str | None:
        """host:port for `grpc.insecure_channel`, None without gRPC."""
        port = self.config.grpc_port
        return None if port is None else f"{self.config.host}:{port}"

    def urls(self) -> dict[str, str | None]:
        return {"http": self.http_url, "openai_base_url": f"{self.http_url}/v1", "grpc": self.grpc_target}

    def stop(self) -> None:
        serve.shutdown()
        if self.owns_ray:
            ray.shutdown()


def start_server_background(
    checkpoint: str | Path | None = None,
    *,
    config: str | Path | None = None,
    set_overrides: Sequence[str] = (),
    host: str | None = None,
    http_port: int | None = None,
    grpc_port: int | None = None,
    api_key: str | None = None,
    **fields: Any,
) -> RunningServer:
    """Deploy the application and return once it serves.

    config: a configs/serve/*.yaml (None: the schema defaults); the arguments override it when not
    None, then `fields` (further ServeConfig keys, e.g. `batching={"max_batch_size": 32}`, merged
    into the config's mappings), then the `--set` overrides. Connects to a running Ray (RAY_ADDRESS
    or an earlier `ray.init`) or starts a local one. Serve's ports are cluster-wide: on a cluster
    where Serve already runs, its existing ports stay (Serve logs that the new ones are ignored)."""
    cfg = load_serve_config(
        config,
        set_overrides,
        checkpoint=None if checkpoint is None else str(checkpoint),
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        api_key=api_key,
        **fields,
    )
    deployment_plan(cfg)  # a bad checkpoint or infer config fails here, before anything starts
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath()}})
    grpc_options = None
    if cfg.grpc_port is not None:
        grpc_options = gRPCOptions(port=cfg.grpc_port, grpc_servicer_functions=[GRPC_SERVICER])
    try:
        serve.start(http_options=HTTPOptions(host=cfg.host, port=cfg.http_port), grpc_options=grpc_options)
        module, _, name = APP_BUILDER.partition(":")
        build_app = getattr(importlib.import_module(module), name)
        serve.run(build_app(cfg.model_dump()), name=cfg.app_name, route_prefix="/", blocking=False)
    except BaseException:
        if owns_ray:
            ray.shutdown()
        raise
    return RunningServer(cfg, owns_ray)


def start_server(checkpoint: str | Path | None = None, **kwargs: Any) -> None:
    """`dimoe infer serve`: start (arguments as `start_server_background`), print the URLs, serve
    until Ctrl-C or SIGTERM, then shut down."""
    server = start_server_background(checkpoint, **kwargs)
    for name, url in server.urls().items():
        if url is not None:
            print(f"{name}: {url}", flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` / a container stop: shut down cleanly too
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def worker_pythonpath() -> str:
    """PYTHONPATH for the Ray workers of a cluster this process starts: the project first."""
    existing = os.environ.get("PYTHONPATH")
    return os.pathsep.join([str(PROJECT_ROOT), *([existing] if existing else [])])
