"""Schema of `configs/serve/*.yaml`: the Ray Serve application of docs/design.md §6.

    config = load_serve_config("configs/serve/default.yaml", ["batching.max_batch_size=32"],
                               checkpoint="artifacts/train/stage3_lownfe/final")

The same keys are the `args:` of `dimoe.serving.app:build_app` in `serve/serve_config.yaml`
(there the ports come from Serve's own `http_options` / `grpc_options`, which are cluster-wide).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from dimoe.config.base import StrictModel
from dimoe.config.loader import apply_overrides, deep_merge, read_yaml_tree, validate
from dimoe.data.images import DEFAULT_MAX_PIXELS


class BatchingConfig(StrictModel):
    """`@serve.batch` of the decoder: a batch runs when it is full or when the first request in it
    has waited `batch_wait_timeout_s`."""

    max_batch_size: int = Field(16, gt=0)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)


class AutoscalingConfig(StrictModel):
    """Serve autoscaling of the decoder on ongoing requests per replica."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, gt=0)
    # Default: one full batch per replica.
    target_ongoing_requests: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}")
        return self


class DecoderConfig(StrictModel):
    """The decoder deployment: one model per replica."""

    num_replicas: int = Field(1, gt=0)
    autoscaling: AutoscalingConfig | None = None  # when set, replaces num_replicas
    # Requests a replica accepts at once (in its batch queue or decoding); default 2 × max_batch_size,
    # so that the next batch fills while one decodes.
    max_ongoing_requests: int | None = Field(None, gt=0)
    # Requests waiting for a replica beyond that; more are refused with 503 (-1 = no limit).
    max_queued_requests: int = Field(256, ge=-1)
    num_cpus: float = Field(1.0, ge=0.0)
    torch_threads: int | None = Field(None, gt=0)  # default: num_cpus (at least 1)
    device: str = "cpu"


class IngressConfig(StrictModel):
    """The HTTP/gRPC ingress deployment: light async work, so no CPU reserved and many requests each."""

    num_replicas: int = Field(1, gt=0)
    max_ongoing_requests: int = Field(256, gt=0)
    max_queued_requests: int = Field(1024, ge=-1)
    num_cpus: float = Field(0.0, ge=0.0)


class LimitsConfig(StrictModel):
    """What one request may ask for; beyond these it gets a 4xx naming the limit."""

    max_tokens: int = Field(512, gt=0)  # largest gen_length (`max_tokens`) of a request
    max_image_bytes: int = Field(8 * 2**20, gt=0)
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    max_request_bytes: int = Field(16 * 2**20, gt=0)  # whole HTTP body (a base64 image is 4/3 its size)


class ServeConfig(StrictModel):
    checkpoint: str | None = None  # HF-format checkpoint directory; required to start
    model_name: str = "dimoe-vl"  # the `model` clients ask for and see in /v1/models
    app_name: str = "dimoe"
    host: str = "127.0.0.1"  # the HTTP proxy's address; 0.0.0.0 exposes it to the network
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int | None = Field(9000, ge=0, le=65535)  # None: no gRPC server
    infer_config: str | None = None  # configs/infer/*.yaml with the presets; None: the schema defaults
    # Bearer token clients must send; prefer the DIMOE_API_KEY environment variable to writing it here.
    api_key: str | None = None
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    @model_validator(mode="after")
    def _batch_fits_ongoing(self) -> ServeConfig:
        ongoing = self.decoder.max_ongoing_requests
        if ongoing is not None and ongoing < self.batching.max_batch_size:
            raise ValueError(
                f"decoder.max_ongoing_requests={ongoing} is below batching.max_batch_size="
                f"{self.batching.max_batch_size}: a batch can never hold more than the ongoing requests"
            )
        return self

    @property
    def decoder_max_ongoing_requests(self) -> int:
        return self.decoder.max_ongoing_requests or 2 * self.batching.max_batch_size


def load_serve_config(
    path: str | Path | None = None, overrides: Iterable[str] = (), **fields: Any
) -> ServeConfig:
    """Load `path` (None: the defaults), merge `fields` (nested mappings deep-merged, None values
    ignored so a CLI can pass every option) and the `--set` `overrides`, validate."""
    data = read_yaml_tree(path) if path is not None else {}
    data = deep_merge(data, {key: value for key, value in fields.items() if value is not None})
    data = apply_overrides(data, overrides)
    return validate(data, ServeConfig, str(path) if path is not None else "<serve config>")
