"""Serving throughput with and without batching: the Serve application on a local 2-CPU Ray cluster,
decoder `max_batch_size` 32 versus 1, each driven by `--concurrency` clients sending `--requests`
chat completions (preset fast, 16 tokens) through the benchmark actor.

Prints the runs side by side (latency percentiles, requests/s, tokens/s, NFE) with the throughput
ratio and the decoder's mean batch size, and fails if any request was lost or failed. Each of
`--dispatches` (the MoE layer's expert dispatch: `auto`, the grouped GEMM here, and `loop`, the
per-expert fallback) is served in turn from a copy of the checkpoint's config.json that sets it. Without
--checkpoint a random tiny model (configs/model/tiny.yaml) is built: the answers are gibberish, the
compute per request is the real tiny model's.

    python benchmarks/serve_load.py [--checkpoint DIR] [--requests 1000] [--concurrency 32]
        [--dispatches auto,loop] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import ray
from ray import serve

from dimoe.config.loader import load_config
from dimoe.config.model import ModelConfig
from dimoe.data.tokenizer import train_tokenizer
from dimoe.io import free_ports
from dimoe.model.build import build_model, save_checkpoint
from dimoe.serving.load import TABLE_FIELDS, format_table, run_serve_benchmark
from dimoe.serving.server import start_server_background


def tiny_checkpoint(out: Path) -> Path:
    texts = [f"What is {a} plus {b}? The answer is {a + b}." for a in range(60) for b in range(0, 60, 7)]
    texts += [
        f"There is a {c} {s} on the {p}."
        for c in ("red", "green", "blue")
        for s in ("circle", "square")
        for p in ("left", "right")
    ]
    tokenizer = train_tokenizer(texts, 512, out / "tokenizer")
    model = build_model(load_config("configs/model/tiny.yaml", ModelConfig), tokenizer, seed=0)
    return save_checkpoint(model, tokenizer, out / "model")


def with_dispatch(checkpoint: Path, dispatch: str, out: Path) -> Path:
    """The checkpoint with `moe_dispatch` set: its files linked, its config.json rewritten."""
    out.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.name != "config.json":
            (out / item.name).symlink_to(item.resolve())
    config = json.loads((checkpoint / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "moe_dispatch": dispatch}, indent=2))
    return out


def run_one(checkpoint: Path, max_batch_size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Start the application with this batch size, drive the load, read the decoder's batch counts."""
    http_port, grpc_port = free_ports(2)
    server = start_server_background(
        checkpoint,
        http_port=http_port,
        grpc_port=grpc_port,  # always a free one: the config's default (9000) may be taken
        batching={"max_batch_size": max_batch_size, "batch_wait_timeout_s": args.batch_wait},
    )
    try:
        url = server.http_url if args.protocol == "http" else f"grpc://{server.grpc_target}"
        started = time.perf_counter()
        report = run_serve_benchmark(
            url, [args.concurrency], args.requests, preset=args.preset, max_tokens=args.max_tokens
        )
        level = report["levels"][0]
        stats = (
            serve.get_deployment_handle("Decoder", app_name=server.config.app_name).stats.remote().result()
        )
        level["decoder_batches"] = stats["batches"]
        level["decoder_mean_batch_size"] = stats["requests"] / max(stats["batches"], 1)
        level["decoder_batch_sizes"] = stats["batch_sizes"]
        level["max_batch_size"] = max_batch_size
        level["run_s"] = time.perf_counter() - started
        return level
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: a random tiny model)")
    parser.add_argument("--requests", type=int, default=1000, help="requests per configuration")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument("--batch-size", type=int, default=32, help="max_batch_size of the batched run")
    parser.add_argument("--batch-wait", type=float, default=0.01, help="batch_wait_timeout_s")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--dispatches", default="auto,loop", help="comma-separated moe_dispatch values")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs: dict[str, dict[str, Any]] = {}
    try:
        with TemporaryDirectory() as tmp:
            checkpoint = args.checkpoint or tiny_checkpoint(Path(tmp))
            for dispatch in args.dispatches.split(","):
                served = with_dispatch(checkpoint, dispatch, Path(tmp) / dispatch)
                for size in (args.batch_size, 1):
                    runs[f"batch {size}, {dispatch}"] = run_one(served, size, args)
    finally:
        ray.shutdown()

    ratios = {
        dispatch: runs[f"batch {args.batch_size}, {dispatch}"]["requests_per_s"]
        / runs[f"batch 1, {dispatch}"]["requests_per_s"]
        for dispatch in args.dispatches.split(",")
    }
    report = {
        "protocol": args.protocol,
        "preset": args.preset,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "runs": runs,
        "throughput_ratio": ratios,
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    print(format_table(runs, [*TABLE_FIELDS, ("decoder_mean_batch_size", "{:.2f}")]))
    for dispatch, ratio in ratios.items():
        clients = f"{args.concurrency} clients"
        print(f"{dispatch}: throughput ratio batch {args.batch_size} / batch 1, {clients}: {ratio:.2f}x")
    print(f"load average before {load_before}, after {os.getloadavg()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    lost = {name: run["requests"] - run["ok"] for name, run in runs.items() if run["ok"] != args.requests}
    if lost:
        print(f"requests lost or failed: {lost}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
