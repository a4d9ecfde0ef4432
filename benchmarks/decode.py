"""Decoding speed beside task accuracy, at gen 64 and 256 (docs/design.md §5).

Rows: `llada` at LLaDA's published setting (one token per step, steps = gen length, no cache) and
at the `best` preset (prefix cache), each also with the block cache (Fast-dLLM's DualCache);
`threshold` within the one-step-per-token budget with the prefix cache and with the block cache,
and with the prefix cache at the stricter thresholds 0.95 and 0.99; and the presets fast / mid /
best (`threshold`, prefix cache). The same task on a model trained with `attention: block` (block
diffusion, LLaDA2.0's decoding): `llada` one token per step uncached and at `best`, and
`threshold` one step per token and at `best`, both with the exact cache of committed blocks.
Each row prints the task score (exact match, token F1) beside tokens/s (median of --repeats),
NFE, tokens per forward and NFE × active parameters; each `threshold` row whether it meets the
targets: >= 10× the tokens/s of one-token-per-step `llada` and >= 3× `llada` at `best` (both on
the first model, LLaDA's setting), each at <= 1 point lower score, and >= 5 tokens per forward.
NFE counts a block-cache step, which runs one block, as one forward.

A speed means something only on a model that answers. Without --checkpoint, a tiny model is fitted
in-process per gen length and attention (benchmarks/decode_task.py: "describe every shape",
seeded) until it describes a validation set of scenes exactly, and is scored on other held-out
scenes. With --checkpoint (e.g. the demo's artifacts/train/stage3_lownfe/final), --prompts names a
prompts file (dimoe.infer.inputs) whose rows also hold their `reference` answer; the block model's
rows then need --block-checkpoint. --rows keeps the rows whose names contain one of its words
(the two `llada` baselines always run).

    python benchmarks/decode.py [--checkpoint DIR --prompts FILE [--block-checkpoint DIR]]
        [--gen-lengths 64,256] [--repeats 3] [--rows block,best]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from decode_task import fitted_model, scenes, score, shapes_for
from rich.console import Console
from rich.table import Table

from dimoe.config.infer import InferConfig
from dimoe.config.loader import load_config
from dimoe.infer.engine import GenerationEngine
from dimoe.infer.inputs import Request, read_prompts
from dimoe.io import iter_jsonl
from dimoe.model.build import load_checkpoint
from dimoe.model.params import count_parameters

BASELINE, BASELINE_BEST = "llada S=G", "llada best"
BLOCK_MODEL = "block model: "
BLOCK_SIZE = 32  # the block model's blocks: the presets' block_length
TARGETS = {"vs_llada": 10.0, "vs_best": 3.0, "score_drop": 1.0, "tokens_per_forward": 5.0}


def runs(gen_length: int) -> dict[str, tuple[str | None, dict[str, Any]]]:
    """(preset, overrides) of every row."""
    one_per_token = {"steps": gen_length}
    return {
        BASELINE: (None, {"strategy": "llada", "cache": "none", **one_per_token}),
        "llada S=G block": (None, {"strategy": "llada", "cache": "block", **one_per_token}),
        BASELINE_BEST: ("best", {"strategy": "llada"}),
        "llada best block": ("best", {"strategy": "llada", "cache": "block"}),
        "threshold prefix S=G": (None, {"strategy": "threshold", "cache": "prefix", **one_per_token}),
        "threshold block S=G": (None, {"strategy": "threshold", "cache": "block", **one_per_token}),
        # The accuracy a stricter confidence threshold buys back, at the speed it costs.
        "threshold τ0.95 S=G": (None, {"strategy": "threshold", "threshold": 0.95, **one_per_token}),
        "threshold τ0.99 S=G": (None, {"strategy": "threshold", "threshold": 0.99, **one_per_token}),
        "fast": ("fast", {}),
        "mid": ("mid", {}),
        "best": ("best", {}),
    }


def block_model_runs(gen_length: int) -> dict[str, tuple[str | None, dict[str, Any]]]:
    """(preset, overrides) of the block model's rows: its committed blocks are cached exactly
    wherever a cache is asked for (`prefix`), never with `none` (LLaDA's published setting)."""
    one_per_token = {"steps": gen_length}
    return {
        f"{BLOCK_MODEL}llada S=G": (None, {"strategy": "llada", "cache": "none", **one_per_token}),
        f"{BLOCK_MODEL}llada best": ("best", {"strategy": "llada"}),
        f"{BLOCK_MODEL}threshold S=G": (None, {"strategy": "threshold", "cache": "prefix", **one_per_token}),
        f"{BLOCK_MODEL}best": ("best", {}),
    }


def selected(names: list[str], rows: str | None) -> list[str]:
    """The names containing one of the comma-separated `rows` words, and the two baselines."""
    if not rows:
        return names
    words = rows.split(",")
    return [n for n in names if n in (BASELINE, BASELINE_BEST) or any(w in n for w in words)]


def measure_run(
    engine: GenerationEngine,
    requests: list[Request],
    references: list[str],
    repeats: int,
    preset: str | None,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    """Decode `requests` `repeats` times in one batch (after a one-request warm-up); the figures
    of the module docstring, timings as medians."""
    engine.generate(requests[:1], preset, **overrides)
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        results = engine.generate(requests, preset, batch_size=len(requests), **overrides)
        walls.append(time.perf_counter() - started)
    settings = engine.settings(preset, **overrides)
    tokens = sum(len(r.output_ids) for r in results)
    nfe = sum(r.nfe for r in results)
    active_m = count_parameters(engine.model).active_b * 1e3
    return {
        "settings": settings.model_dump(),
        **score(results, references),
        "tokens_per_s": tokens / statistics.median(walls),
        "wall_s": walls,
        "mean_nfe": nfe / len(results),
        "tokens_per_forward": tokens / max(nfe, 1),
        "generated_tokens": tokens,
        "nfe_x_active_params_m": nfe / len(results) * active_m,
        "sample": results[0].output,
    }


def task(
    args: argparse.Namespace, gen_length: int, first: GenerationEngine | None = None
) -> tuple[GenerationEngine, list[Request], list[str]]:
    """The engine, requests and reference answers at `gen_length`. Given the `first` model's engine,
    those of the block model: fitted by block diffusion from the first (LLaDA2.0's route: continue
    training a model into block diffusion; from random init it fitted several times slower)."""
    block_size = BLOCK_SIZE if first else None
    config = load_config("configs/infer/default.yaml", InferConfig)
    checkpoint = args.block_checkpoint if block_size else args.checkpoint
    if checkpoint:
        model, tokenizer = load_checkpoint(checkpoint)
        references = {str(row["id"]): row["reference"] for _, row in iter_jsonl(args.prompts)}
        requests = read_prompts(args.prompts)[: args.requests]
        return GenerationEngine(model, tokenizer, config), requests, [references[r.id] for r in requests]
    shapes = shapes_for(gen_length)
    validation = scenes(16, shapes, args.seed + 1)
    start = (first.model, first.tokenizer) if first else None
    model, tokenizer, steps = fitted_model(
        gen_length, validation, args.fit_steps, args.seed, start, block_size
    )
    attention = model.config.attention
    print(f"gen {gen_length}, {attention}: fitted for {steps} steps ({shapes} shapes a scene)", flush=True)
    held_out = scenes(args.requests, shapes, args.seed + 2)
    requests = [Request(str(i), prompt=q) for i, (q, _) in enumerate(held_out)]
    return GenerationEngine(model, tokenizer, config), requests, [a for _, a in held_out]


def profile(engine: GenerationEngine, requests: list[Request], gen_length: int) -> None:
    """torch.profiler's top operators (self CPU time) of one `threshold` decode per cache."""
    for cache in ("none", "prefix", "block"):
        overrides = {"strategy": "threshold", "steps": gen_length, "gen_length": gen_length, "cache": cache}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            engine.generate(requests, batch_size=len(requests), **overrides)
        print(f"gen {gen_length}, threshold S=G, cache {cache}: top operators by self CPU time")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def benchmark(args: argparse.Namespace, gen_length: int) -> dict[str, dict[str, Any]]:
    figures: dict[str, dict[str, Any]] = {}
    first, requests, references = task(args, gen_length)
    if args.profile:
        profile(first, requests, gen_length)
    engines = [(first, runs(gen_length))]
    wanted = selected(list(block_model_runs(gen_length)), args.rows)
    if wanted and (not args.checkpoint or args.block_checkpoint):  # fit or load it only when its rows run
        engines.append((task(args, gen_length, first)[0], block_model_runs(gen_length)))
    for engine, all_runs in engines:
        for name in selected(list(all_runs), args.rows):
            preset, overrides = all_runs[name]
            figures[name] = measure_run(
                engine, requests, references, args.repeats, preset, {"gen_length": gen_length, **overrides}
            )
            print(f"gen {gen_length}: {name}: {figures[name]['tokens_per_s']:.0f} tok/s", flush=True)
    return figures


def targets(figures: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """Speed-ups of row `name` over the two `llada` rows, its score drop from each (exact match,
    points) and whether all four targets are met."""
    row = figures[name]
    found: dict[str, Any] = {}
    for key, baseline in (("llada", figures[BASELINE]), ("best", figures[BASELINE_BEST])):
        found[f"vs_{key}"] = row["tokens_per_s"] / baseline["tokens_per_s"]
        found[f"drop_vs_{key}"] = baseline["exact_match"] - row["exact_match"]
    found["met"] = (
        found["vs_llada"] >= TARGETS["vs_llada"]
        and found["vs_best"] >= TARGETS["vs_best"]
        and max(found["drop_vs_llada"], found["drop_vs_best"]) <= TARGETS["score_drop"]
        and row["tokens_per_forward"] >= TARGETS["tokens_per_forward"]
    )
    return found


def report(figures: dict[str, dict[str, Any]], title: str, console: Console) -> None:
    table = Table(title=title)
    columns = ("run", "strategy", "cache", "steps", "EM", "F1", "tok/s", "×llada", "×best", "NFE", "tok/fwd")
    for column in (*columns, "NFE×act (M)", "target"):
        table.add_column(column, justify="right")
    for name, f in figures.items():
        s, t = f["settings"], targets(figures, name)
        table.add_row(
            name,
            s["strategy"],
            "exact" if name.startswith(BLOCK_MODEL) and s["cache"] != "none" else s["cache"],
            str(s["steps"]),
            f"{f['exact_match']:.1f}",
            f"{f['token_f1']:.1f}",
            f"{f['tokens_per_s']:.0f}",
            f"{t['vs_llada']:.1f}",
            f"{t['vs_best']:.1f}",
            f"{f['mean_nfe']:.1f}",
            f"{f['tokens_per_forward']:.2f}",
            f"{f['nfe_x_active_params_m']:.1f}",
            ("met" if t["met"] else "not met") if s["strategy"] == "threshold" else "",
        )
    console.print(table)
    console.print(f"sample ({BASELINE}): {figures[BASELINE]['sample']!r}")
    if figures[BASELINE]["exact_match"] < 90:
        console.print(
            f"[bold red]{BASELINE} scores below 90: the model does not answer, so the speeds mean little"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", help="a trained checkpoint (default: fit a tiny model per gen length)"
    )
    parser.add_argument("--prompts", type=Path, help="with --checkpoint: prompts file with `reference`s")
    parser.add_argument(
        "--block-checkpoint", help="with --checkpoint: a model trained with `attention: block`"
    )
    parser.add_argument("--rows", help="comma-separated words: only the rows whose names contain one")
    parser.add_argument("--gen-lengths", default="64,256")
    parser.add_argument("--requests", type=int, default=32, help="held-out prompts, decoded as one batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fit-steps", type=int, default=1500, help="at most this many fitting steps")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="first profile a decode per cache")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.checkpoint and not args.prompts:
        parser.error("--checkpoint needs --prompts (rows with a `reference` answer)")
    if args.block_checkpoint and not args.checkpoint:
        parser.error("--block-checkpoint goes with --checkpoint and --prompts (the same prompts score both)")
    torch.set_num_threads(args.threads)
    console = Console(width=160)
    load_before = os.getloadavg()
    console.print(f"load average (1, 5, 15 min) at start: {load_before}; {os.cpu_count()} CPUs")
    all_figures = {}
    for gen_length in [int(g) for g in args.gen_lengths.split(",")]:
        all_figures[gen_length] = benchmark(args, gen_length)
    load_after = os.getloadavg()
    for gen_length, figures in all_figures.items():
        title = f"gen {gen_length}, block length 32, {args.requests} requests in one batch"
        title += f", median of {args.repeats}"
        report(figures, title, console)
    console.print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    if args.json:
        payload = {"load_before": load_before, "load_after": load_after, "figures": all_figures}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
