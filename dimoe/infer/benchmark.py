"""Decoding benchmark: one strategy next to the `llada` baseline on the same prompts (docs/design.md §5).

Reported per strategy: request latency p50/p95, throughput (generated tokens / s, tokens before
the first EOS), tokens per forward, mean NFE, the backbone's active parameters (billions) and
NFE × active parameters, the decoding compute per request in billion-parameter forwards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dimoe.config.infer import InferConfig
from dimoe.config.loader import load_config
from dimoe.errors import UserError
from dimoe.infer.engine import GenerationEngine, collect_results
from dimoe.infer.inputs import Request, read_prompts
from dimoe.io import write_json
from dimoe.model.params import count_parameters

BASELINE = "llada"


def measure(
    engine: GenerationEngine,
    requests: list[Request],
    preset: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Decode `requests` once (after a one-request warm-up) and report the figures of the module
    docstring for these settings."""
    settings = engine.settings(preset, **overrides)
    engine.generate(requests[:1], preset, batch_size, **overrides)  # warm-up: first-call overheads
    started = time.perf_counter()
    results = collect_results(engine, requests, progress, preset=preset, batch_size=batch_size, **overrides)
    wall = time.perf_counter() - started
    latencies = np.array([r.latency_s for r in results])
    nfe = np.array([r.nfe for r in results])
    tokens = sum(len(r.output_ids) for r in results)
    active_b = count_parameters(engine.model).active_b
    return {
        "settings": settings.model_dump(),
        "requests": len(results),
        "batch_size": batch_size or engine.config.batch_size,
        "wall_s": wall,
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p95_s": float(np.percentile(latencies, 95)),
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "tokens_per_forward": tokens / max(int(nfe.sum()), 1),
        "mean_nfe": float(nfe.mean()),
        "active_params_b": active_b,
        "nfe_x_active_params_b": float(nfe.mean()) * active_b,
    }


def compare_with_llada(
    engine: GenerationEngine,
    requests: list[Request],
    preset: str | None = None,
    strategy: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """`measure` for `strategy` (default: the preset's) and for `llada` with the same preset,
    plus the ratios strategy / llada of NFE and tokens/s."""
    chosen = strategy or engine.settings(preset, **overrides).strategy
    report: dict[str, Any] = {"preset": preset or engine.config.default_preset, "strategy": chosen}
    for name in dict.fromkeys([chosen, BASELINE]):
        report[name] = measure(engine, requests, preset, batch_size, progress, strategy=name, **overrides)
    report["ratios"] = {
        "nfe": report[chosen]["mean_nfe"] / report[BASELINE]["mean_nfe"],
        "tokens_per_s": report[chosen]["tokens_per_s"] / report[BASELINE]["tokens_per_s"],
    }
    return report


def run_benchmark(
    checkpoint: str | Path,
    dataset_jsonl: str | Path,
    preset: str | None = None,
    strategy: str | None = None,
    *,
    out: str | Path | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    overrides: dict[str, Any] | None = None,
    config_path: str | Path | None = None,
    set_overrides: Sequence[str] = (),
    progress: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """`dimoe infer benchmark`: `compare_with_llada` on the rows of a prompts file (the format of
    `dimoe.infer.inputs`), the first `limit` of them if given; written to `out` as JSON if given."""
    config = load_config(config_path, InferConfig, set_overrides)
    fields = dict(overrides or {})
    strategy = strategy or fields.pop("strategy", None)
    batch_size = batch_size or fields.pop("batch_size", None)
    config.resolve(preset, {**fields, "strategy": strategy})  # fail fast on bad settings
    requests = read_prompts(dataset_jsonl)[:limit]
    if not requests:
        raise UserError(f"{dataset_jsonl}: no prompts to benchmark")
    engine = GenerationEngine.from_checkpoint(checkpoint, config, device=device)
    report = compare_with_llada(engine, requests, preset, strategy, batch_size, progress, **fields)
    report.update(checkpoint=str(checkpoint), dataset=str(dataset_jsonl))
    if out is not None:
        write_json(out, report)
    return report
