"""The DiMoE-VL Serve application: `serve run serve/serve_config.yaml`, or `serve.app:build_app`
with the args of a ServeConfig (see dimoe/config/serve.py and configs/serve/default.yaml)."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from dimoe.serving.server import deployment_plan, serve_config_from_args
from serve.decoder import Decoder
from serve.ingress import Ingress


def build_app(args: dict[str, Any]) -> Application:
    """Ingress → Decoder, configured from `args` (ServeConfig keys, optionally `config`: a YAML
    file they override, and `set`: a list of `a.b=value` overrides)."""
    plan = deployment_plan(serve_config_from_args(args))
    decoder = Decoder.options(**plan.decoder_options).bind(**plan.decoder_args)
    return Ingress.options(**plan.ingress_options).bind(decoder, **plan.ingress_args)
