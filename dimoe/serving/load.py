"""Load driver for a running server: `concurrency` clients send `requests` calls in total over
HTTP (`/v1/chat/completions`) or gRPC (`Generate`) and the run is summarised as JSON.

    report = run_serve_benchmark("http://127.0.0.1:8000", concurrency=[1, 8, 32], requests=200)

Reported per concurrency level: client-side latency p50/p95/p99, requests/s, generated tokens/s,
mean NFE, mean NFE × active parameters (billions) and errors by kind; no request is dropped from
the counts (ok + errors = requests). The driver runs as a Ray actor so that it sits next to the
server in the cluster; `use_ray=False` runs it in this process.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import ray

from dimoe.serving.http import resolve_api_key

PROMPTS = (
    "What colour is the square?",
    "Describe the image in one sentence.",
    "What is {i} plus {j}?",
    "Where is the circle?",
    "Name a shape with three sides.",
    "Count the triangles: {i}.",
)


@dataclass(frozen=True)
class Sample:
    """One request as the client saw it."""

    latency_s: float
    error: str | None = None  # None = success; else a short kind (http_503, timeout, ...)
    completion_tokens: int = 0
    nfe: int = 0
    nfe_x_active_params_b: float = 0.0


def prompt_of(index: int) -> str:
    """Varied prompts (so batches mix prompt lengths), deterministic per index."""
    return PROMPTS[index % len(PROMPTS)].format(i=index, j=index % 7)


class LoadDriver:
    """Sends the load. `url` is http(s)://host:port or grpc://host:port."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        preset: str | None = "fast",
        max_tokens: int = 16,
        timeout_s: float = 300.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.preset = preset
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s

    async def run(self, concurrency: int, requests: int, warmup: int = 0) -> dict[str, Any]:
        """`warmup` requests first (not counted), then the measured run."""
        if self.url.startswith("grpc://"):
            return await self._grpc(concurrency, requests, warmup)
        return await self._http(concurrency, requests, warmup)

    async def _http(self, concurrency: int, requests: int, warmup: int) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(
            base_url=self.url, headers=headers, limits=limits, timeout=self.timeout_s
        ) as client:
            model = self.model or await served_model(client)

            async def call(index: int) -> Sample:
                body: dict[str, Any] = {
                    "model": model,
                    "messages": [{"role": "user", "content": prompt_of(index)}],
                    "max_tokens": self.max_tokens,
                }
                if self.preset:
                    body["preset"] = self.preset
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/chat/completions", json=body)
                except httpx.TimeoutException:
                    return Sample(time.perf_counter() - started, "timeout")
                except httpx.HTTPError as exc:
                    return Sample(time.perf_counter() - started, type(exc).__name__)
                latency = time.perf_counter() - started
                if response.status_code != 200:
                    return Sample(latency, f"http_{response.status_code}")
                data = response.json()
                stats = data["dimoe"]
                tokens = data["usage"]["completion_tokens"]
                return Sample(latency, None, tokens, stats["nfe"], stats["nfe_x_active_params_b"])

            return await measure(call, concurrency, requests, warmup)

    async def _grpc(self, concurrency: int, requests: int, warmup: int) -> dict[str, Any]:
        import grpc

        from dimoe.serving.proto import dimoe_pb2 as pb2
        from dimoe.serving.proto import dimoe_pb2_grpc as pb2_grpc

        metadata = [("authorization", f"Bearer {self.api_key}")] if self.api_key else None
        async with grpc.aio.insecure_channel(self.url.removeprefix("grpc://")) as channel:
            stub = pb2_grpc.DiMoEStub(channel)

            async def call(index: int) -> Sample:
                request = pb2.GenerateRequest(
                    prompt=prompt_of(index), preset=self.preset or "", gen_length=self.max_tokens
                )
                started = time.perf_counter()
                try:
                    reply = await stub.Generate(request, metadata=metadata, timeout=self.timeout_s)
                except grpc.aio.AioRpcError as exc:
                    return Sample(time.perf_counter() - started, f"grpc_{exc.code().name.lower()}")
                latency = time.perf_counter() - started
                return Sample(latency, None, reply.completion_tokens, reply.nfe, reply.nfe_x_active_params_b)

            return await measure(call, concurrency, requests, warmup)


async def served_model(client: httpx.AsyncClient) -> str:
    """The model the server serves (the first of GET /v1/models)."""
    response = await client.get("/v1/models")
    if response.status_code != 200:
        raise RuntimeError(f"GET /v1/models answered {response.status_code}: {response.text[:200]}")
    return response.json()["data"][0]["id"]


async def measure(
    call: Callable[[int], Awaitable[Sample]], concurrency: int, requests: int, warmup: int
) -> dict[str, Any]:
    """Run `call` for request indices 0..requests-1 from `concurrency` workers (each takes the next
    index when its previous call returns, so exactly `concurrency` calls are in flight)."""

    async def drain(indices: Sequence[int], sink: list[Sample]) -> None:
        source = iter(indices)

        async def worker() -> None:
            for index in source:  # the shared iterator hands each index to exactly one worker
                sink.append(await call(index))

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    await drain(range(requests, requests + warmup), [])
    samples: list[Sample] = []
    started = time.perf_counter()
    await drain(range(requests), samples)
    return summarize(samples, time.perf_counter() - started, concurrency)


def summarize(samples: list[Sample], wall_s: float, concurrency: int) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None]
    latencies = np.array([s.latency_s for s in ok]) if ok else np.zeros(1)
    tokens = sum(s.completion_tokens for s in ok)
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "ok": len(ok),
        "errors": len(samples) - len(ok),
        "errors_by_kind": dict(Counter(s.error for s in samples if s.error is not None)),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p95_s": float(np.percentile(latencies, 95)),
        "latency_p99_s": float(np.percentile(latencies, 99)),
        "latency_mean_s": float(latencies.mean()),
        "mean_completion_tokens": tokens / len(ok) if ok else 0.0,
        "mean_nfe": float(np.mean([s.nfe for s in ok])) if ok else 0.0,
        "mean_nfe_x_active_params_b": float(np.mean([s.nfe_x_active_params_b for s in ok])) if ok else 0.0,
    }


def run_serve_benchmark(
    url: str,
    concurrency: Sequence[int] | int,
    requests: int,
    *,
    api_key: str | None = None,
    model: str | None = None,
    preset: str | None = "fast",
    max_tokens: int = 16,
    warmup: int | None = None,
    timeout_s: float = 300.0,
    use_ray: bool = True,
) -> dict[str, Any]:
    """`dimoe infer benchmark --serve-url URL --concurrency 1,8,32 --requests N`: the report of
    the module docstring for each concurrency level, in order. `api_key` defaults to the
    DIMOE_API_KEY environment variable, `model` to the one the server lists. `warmup` requests
    (default: one per client) run before each level and are not counted. The driver runs as a Ray
    actor (connecting to the running Ray, or starting a local one for the run) unless
    `use_ray=False`."""
    levels = [concurrency] if isinstance(concurrency, int) else list(concurrency)
    if not levels or min(levels) < 1 or requests < 1:
        raise ValueError(f"need concurrency levels >= 1 and requests >= 1, got {levels} and {requests}")
    api_key = api_key if api_key is not None else resolve_api_key(None)
    options = {
        "api_key": api_key,
        "model": model,
        "preset": preset,
        "max_tokens": max_tokens,
        "timeout_s": timeout_s,
    }
    results = []
    if use_ray:
        owns_ray = not ray.is_initialized()
        if owns_ray:
            ray.init(include_dashboard=False)
        try:
            # No CPU reserved: the driver waits on sockets, and the server's replicas need the cores.
            driver = ray.remote(num_cpus=0)(LoadDriver).remote(url, **options)
            for level in levels:
                results.append(
                    ray.get(driver.run.remote(level, requests, level if warmup is None else warmup))
                )
            ray.kill(driver)
        finally:
            if owns_ray:
                ray.shutdown()
    else:
        driver = LoadDriver(url, **options)
        for level in levels:
            results.append(asyncio.run(driver.run(level, requests, level if warmup is None else warmup)))
    protocol = "grpc" if url.startswith("grpc://") else "http"
    return {"url": url, "protocol": protocol, "preset": preset, "max_tokens": max_tokens, "levels": results}


TABLE_FIELDS = (
    ("requests", "{:.0f}"),
    ("ok", "{:.0f}"),
    ("errors", "{:.0f}"),
    ("requests_per_s", "{:.2f}"),
    ("tokens_per_s", "{:.1f}"),
    ("latency_p50_s", "{:.3f}"),
    ("latency_p95_s", "{:.3f}"),
    ("latency_p99_s", "{:.3f}"),
    ("mean_nfe", "{:.2f}"),
    ("mean_nfe_x_active_params_b", "{:.5f}"),
)


def format_table(rows: dict[str, dict[str, Any]], fields: Sequence[tuple[str, str]] = TABLE_FIELDS) -> str:
    """Summaries side by side (one column per named run) as a plain-text table; `fields` are
    (key, format) pairs."""
    names = list(rows)
    width = max(12, *(len(name) for name in names)) + 2
    lines = [" " * 28 + "".join(f"{name:>{width}}" for name in names)]
    for field, fmt in fields:
        lines.append(f"{field:28}" + "".join(f"{fmt.format(rows[name][field]):>{width}}" for name in names))
    return "\n".join(lines)
