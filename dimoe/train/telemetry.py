"""Training telemetry: JSON-lines logs that `dimoe diag` reads, and Ray metrics gauges (declared in
`dimoe.telemetry.catalogue`).

Files under `<output_dir>/<stage>/logs/` (schema in docs/telemetry.md):
- `train_metrics.jsonl`: step, loss terms, lr per group, grad norm, tokens/s, supervision counts;
- `routing_stats.jsonl`: per layer expert load per t-bucket, router entropy, view overlap, modality usage;
- `gradient_stats.jsonl`: grad norms of vision tower, projector, attention, router, each expert.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dimoe.io import append_jsonl
from dimoe.telemetry import catalogue

LOG_FILES = ("train_metrics", "routing_stats", "gradient_stats")


class JsonlLogger:
    def __init__(self, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.paths = {name: log_dir / f"{name}.jsonl" for name in LOG_FILES}

    def write(self, stream: str, record: dict[str, Any]) -> None:
        append_jsonl(self.paths[stream], record)


def gradient_stats(
    model: torch.nn.Module, grad_of: Callable[[torch.nn.Parameter], torch.Tensor | None]
) -> dict:
    """Gradient norms by component; `grad_of` returns a parameter's full gradient (DeepSpeed's
    `safe_get_full_grad` under ZeRO, `p.grad` otherwise). Must be called on every rank under ZeRO-3."""
    sq: dict[str, float] = {"vision": 0.0, "projector": 0.0, "attention": 0.0, "router": 0.0, "other": 0.0}
    experts: list[list[float]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        grad = grad_of(param)
        if grad is None:
            continue
        grad = grad.float()
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            layer = int(name.split(".")[1])
            while len(experts) <= layer:
                experts.append([])
            per_expert = grad.pow(2).flatten(1).sum(1).tolist()
            previous = experts[layer] or [0.0] * len(per_expert)
            experts[layer] = [a + b for a, b in zip(previous, per_expert, strict=True)]
            continue
        key = (
            "vision" if name.startswith("vision.encoder.")
            else "projector" if name.startswith("vision.projector.")
            else "router" if ".mlp.gate." in name
            else "attention" if ".self_attn." in name
            else "other"
        )  # fmt: skip
        sq[key] += grad.pow(2).sum().item()
    record = {k: math.sqrt(v) for k, v in sq.items()}
    record["experts"] = [[math.sqrt(v) for v in layer] for layer in experts]
    record["backbone"] = math.sqrt(
        sq["attention"] + sq["router"] + sq["other"] + sum(sum(x) for x in experts)
    )
    return record


class RoutingGauges:
    """The training gauges of the metrics catalogue (exported as `ray_dimoe_*`), tagged by stage,
    layer and expert only (low cardinality).

    `dimoe_routing_nonstationarity{stage,layer}` is problem A of docs/design.md §4 at this log step, as
    `dimoe diag routing` computes it offline: the mean Jensen–Shannon divergence (bits) between each
    t-bucket's expert load and the all-bucket mean."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.load = catalogue.EXPERT_LOAD.create()
        self.entropy = catalogue.ROUTER_ENTROPY.create()
        self.overlap = catalogue.VIEW_CONSISTENCY.create()
        self.loss = catalogue.TRAIN_LOSS.create()
        self.nonstationarity = catalogue.ROUTING_NONSTATIONARITY.create()

    def publish(self, metrics: dict[str, float], routing: dict[str, Any]) -> None:
        """Set the gauges from one logged step: its `train_metrics` and `routing_stats` records."""
        for term, value in metrics.items():
            if term.startswith("loss"):
                self.loss.set(value, tags={"stage": self.stage, "term": term})
        weights = np.asarray(routing.get("bucket_tokens", []), dtype=float)
        for layer, buckets in enumerate(routing.get("expert_load", [])):
            self._publish_layer(layer, np.asarray(buckets, dtype=float), weights, routing)

    def _publish_layer(
        self, layer: int, load: np.ndarray, weights: np.ndarray, routing: dict[str, Any]
    ) -> None:
        # Imported here: `dimoe.diag` loads matplotlib and pyarrow, which only rank 0 needs, and only
        # once it publishes.
        from dimoe.diag.routing import layer_nonstationarity

        tags = {"stage": self.stage, "layer": str(layer)}
        # Token-weighted over t-buckets, so the gauge is the layer's load over all visible tokens.
        loads = weights @ load / (weights.sum() or 1.0)
        for expert, value in enumerate(loads.tolist()):
            self.load.set(value, tags={**tags, "expert": str(expert)})
        self.entropy.set(routing["router_entropy"][layer], tags=tags)
        if routing.get("topk_overlap") is not None:
            self.overlap.set(routing["topk_overlap"][layer], tags=tags)
        drift = layer_nonstationarity(load, weights)
        if drift is not None:  # None: no visible token counted in any bucket this step
            self.nonstationarity.set(drift, tags=tags)
