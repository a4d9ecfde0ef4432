"""Training telemetry: JSON-lines logs that `dimoe diag` reads, and Ray metrics gauges.

Files under `<output_dir>/<stage>/logs/` (schema in docs/telemetry.md):
- `train_metrics.jsonl`: step, loss terms, lr per group, grad norm, tokens/s, supervision counts;
- `routing_stats.jsonl`: per layer expert load per t-bucket, router entropy, view overlap, modality usage;
- `gradient_stats.jsonl`: grad norms of vision tower, projector, attention, router, each expert.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

LOG_FILES = ("train_metrics", "routing_stats", "gradient_stats")


class JsonlLogger:
    def __init__(self, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.paths = {name: log_dir / f"{name}.jsonl" for name in LOG_FILES}

    def write(self, stream: str, record: dict[str, Any]) -> None:
        with self.paths[stream].open("a") as handle:
            handle.write(json.dumps(record) + "\n")


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
    """Ray metrics (exported as `ray_dimoe_*`), tagged by layer and expert only (low cardinality).

    `dimoe_routing_nonstationarity{stage,layer}` is problem A of docs/design.md §4 at this log step, as
    `dimoe diag routing` computes it offline: the mean Jensen–Shannon divergence (bits) between each
    t-bucket's expert load and the all-bucket mean."""

    def __init__(self, stage: str) -> None:
        from ray.util.metrics import Gauge

        tags = ("stage", "layer", "expert")
        self.stage = stage
        self.load = Gauge("dimoe_expert_load", "Fraction of top-k assignments per expert", tag_keys=tags)
        self.entropy = Gauge("dimoe_router_entropy", "Mean router entropy", tag_keys=("stage", "layer"))
        self.overlap = Gauge(
            "dimoe_view_consistency", "Top-k Jaccard overlap between views", tag_keys=("stage", "layer")
        )
        self.loss = Gauge("dimoe_train_loss", "Training loss terms", tag_keys=("stage", "term"))
        self.nonstationarity = Gauge(
            "dimoe_routing_nonstationarity",
            "Mean JS divergence (bits) of each t-bucket's expert load from the all-bucket mean (problem A)",
            tag_keys=("stage", "layer"),
        )

    def publish(self, metrics: dict[str, float], routing: dict[str, Any]) -> None:
        from dimoe.diag.routing import layer_nonstationarity

        for term, value in metrics.items():
            if term.startswith("loss"):
                self.loss.set(value, tags={"stage": self.stage, "term": term})
        for layer, buckets in enumerate(routing.get("expert_load", [])):
            weights = routing["bucket_tokens"]
            total = sum(weights) or 1.0
            loads = [
                sum(w * b[expert] for w, b in zip(weights, buckets, strict=True)) / total
                for expert in range(len(buckets[0]))
            ]
            for expert, load in enumerate(loads):
                self.load.set(load, tags={"stage": self.stage, "layer": str(layer), "expert": str(expert)})
            self.entropy.set(
                routing["router_entropy"][layer], tags={"stage": self.stage, "layer": str(layer)}
            )
            if routing.get("topk_overlap") is not None:
                self.overlap.set(
                    routing["topk_overlap"][layer], tags={"stage": self.stage, "layer": str(layer)}
                )
            drift = layer_nonstationarity(np.asarray(buckets, dtype=float), np.asarray(weights, dtype=float))
            if drift is not None:  # None: no visible token counted in any bucket this step
                self.nonstationarity.set(drift, tags={"stage": self.stage, "layer": str(layer)})
