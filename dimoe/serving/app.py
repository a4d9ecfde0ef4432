"""The DiMoE-VL Serve application (docs/design.md §6): Ingress → Decoder.

`build_app` is the application's import path, `dimoe.serving.app:build_app`, for
`serve run serve/serve_config.yaml`, a KubeRay RayService and `dimoe infer serve` alike; its `args`
are the keys of a ServeConfig (dimoe/config/serve.py, configs/serve/default.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.serve import Application

from dimoe.config.infer import InferConfig
from dimoe.config.loader import load_config
from dimoe.config.serve import ServeConfig, load_serve_config
from dimoe.errors import UserError
from dimoe.serving.decoder_deployment import Decoder
from dimoe.serving.http import api_key_digest
from dimoe.serving.ingress_deployment import Ingress


def build_app(args: dict[str, Any]) -> Application:
    """Ingress → Decoder, configured from `args` (ServeConfig keys, optionally `config`: a YAML
    file they override, and `set`: a list of `a.b=value` overrides)."""
    return application(serve_config_from_args(args))


def application(config: ServeConfig) -> Application:
    """Ingress → Decoder for a loaded config; nothing runs until it is deployed."""
    plan = deployment_plan(config)
    decoder = Decoder.options(**plan.decoder_options).bind(**plan.decoder_args)
    return Ingress.options(**plan.ingress_options).bind(decoder, **plan.ingress_args)


@dataclass(frozen=True)
class DeploymentPlan:
    """Options and constructor arguments of the two deployments."""

    decoder_options: dict[str, Any]
    decoder_args: dict[str, Any]
    ingress_options: dict[str, Any]
    ingress_args: dict[str, Any]


def serve_config_from_args(args: dict[str, Any]) -> ServeConfig:
    """The `args:` of `build_app`: ServeConfig keys, plus optionally `config` (a
    configs/serve/*.yaml the keys override) and `set` (a list of `a.b=value` overrides)."""
    fields = dict(args)
    path = fields.pop("config", None)
    overrides = fields.pop("set", None) or []
    return load_serve_config(path, overrides, **fields)


def deployment_plan(config: ServeConfig) -> DeploymentPlan:
    """Check the checkpoint and the infer config here, on the driver, so that a mistake is one clear
    error instead of replicas failing to start; paths are made absolute for the replicas."""
    if config.checkpoint is None:
        raise UserError(
            "no checkpoint to serve: pass --checkpoint DIR or set `checkpoint` in the serve config"
        )
    checkpoint = Path(config.checkpoint).expanduser().resolve()
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} has no config.json")
    # Loaded here and passed by value: the replicas need not find the YAML file.
    infer = load_config(config.infer_config, InferConfig)
    decoder, batching, ingress = config.decoder, config.batching, config.ingress
    return DeploymentPlan(
        decoder_options=_decoder_options(config),
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


def _decoder_options(config: ServeConfig) -> dict[str, Any]:
    """Replica count (fixed or autoscaled on ongoing requests) and queue bounds of the decoder."""
    decoder = config.decoder
    options: dict[str, Any] = {
        "max_ongoing_requests": config.decoder_max_ongoing_requests,
        "max_queued_requests": decoder.max_queued_requests,
        "ray_actor_options": {"num_cpus": decoder.num_cpus},
    }
    if decoder.autoscaling is None:
        options["num_replicas"] = decoder.num_replicas
        return options
    scaling = decoder.autoscaling
    options["autoscaling_config"] = {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        # One full batch per replica unless the config says otherwise.
        "target_ongoing_requests": scaling.target_ongoing_requests or config.batching.max_batch_size,
    }
    return options
