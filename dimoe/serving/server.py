"""Start the Ray Serve application of `dimoe.serving.app` (docs/design.md §6) from Python or the CLI.

    server = start_server_background("artifacts/train/stage3_lownfe/final", http_port=8000)
    print(server.http_url)   # http://127.0.0.1:8000 — OpenAI clients use base_url=server.http_url + "/v1"
    server.stop()

`start_server` is the blocking form behind `dimoe infer serve`. Both deploy the application that
`dimoe.serving.app:build_app` (the import path of `serve run serve/serve_config.yaml`) builds, so
there is one way to assemble it.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from dimoe.config.serve import ServeConfig, load_serve_config
from dimoe.serving.app import application
from dimoe.serving.proto.dimoe_pb2_grpc import add_DiMoEServicer_to_server

# Serve's proxy imports the servicer function by name, in its own process.
GRPC_SERVICER = f"{add_DiMoEServicer_to_server.__module__}.{add_DiMoEServicer_to_server.__name__}"


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
    app = application(cfg)  # a bad checkpoint or infer config fails here, before anything starts
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init()
    grpc_options = None
    if cfg.grpc_port is not None:
        grpc_options = gRPCOptions(port=cfg.grpc_port, grpc_servicer_functions=[GRPC_SERVICER])
    try:
        serve.start(http_options=HTTPOptions(host=cfg.host, port=cfg.http_port), grpc_options=grpc_options)
        serve.run(app, name=cfg.app_name, route_prefix="/", blocking=False)
        running = RunningServer(cfg, owns_ray)
        wait_until_answering(f"{running.http_url}/healthz")
    except BaseException:
        if owns_ray:
            ray.shutdown()
        raise
    return running


def wait_until_answering(url: str, timeout_s: float = 60.0) -> None:
    """Return once `url` answers 200. `serve.run` returns when the deployments are ready, but the
    HTTP proxy, recreated when Serve restarts in the same Ray session, may not listen yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (a local URL we built)
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the application started but {url} did not answer within {timeout_s:.0f} s; if Serve "
                "already ran in this Ray cluster, it kept its earlier ports (`serve shutdown` first)"
            )
        time.sleep(0.25)


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
