"""The Decoder deployment of the Serve application (docs/design.md §6): one model per replica;
concurrent requests are batched into engine calls (the engine work itself is `DecoderCore`).

Engine calls run on the replica's event loop and block it. A worker thread would keep the loop
free in principle, but on CPU the model's Python-heavy forward holds the GIL and starves the loop
that takes requests in: with 32 clients, batches averaged about 2 requests instead of about 30.
Requests that arrive during a batch wait in Ray's queue and form the next batch as soon as the
loop is free. Streaming requests bypass batching and decode one block per turn of the loop.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve

from dimoe.config.infer import InferConfig
from dimoe.serving.decoder import DecoderCore, PreparedJob
from dimoe.serving.errors import RequestRejected
from dimoe.serving.jobs import DecodeJob, DecodeOutcome, StreamEvent
from dimoe.serving.metrics import DecoderMetrics

# Engine calls that may fail in a row before the replica reports itself unhealthy (Serve replaces it).
MAX_CONSECUTIVE_FAILURES = 3


@serve.deployment(name="Decoder")
class Decoder:
    def __init__(
        self,
        checkpoint: str,
        infer_config: dict[str, Any],
        max_batch_size: int,
        batch_wait_timeout_s: float,
        torch_threads: int = 1,
        device: str = "cpu",
    ) -> None:
        torch.set_num_threads(torch_threads)
        self.core = DecoderCore.from_checkpoint(checkpoint, InferConfig.model_validate(infer_config), device)
        self.decode_batch.set_max_batch_size(max_batch_size)
        self.decode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.metrics = DecoderMetrics()
        self.batch_sizes: Counter[int] = Counter()
        self.in_flight = 0
        self.consecutive_failures = 0

    async def generate(self, job: DecodeJob) -> DecodeOutcome:
        """Decode one job in a batch with the jobs that arrive around it."""
        try:
            prepared = self.core.prepare(job)
        except RequestRejected as exc:
            self.metrics.rejected.inc(tags={"kind": exc.error.kind})
            return DecodeOutcome(error=exc.error)
        self._track(+1)
        try:
            return await self.decode_batch(prepared)
        finally:
            self._track(-1)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # both reset from the config in __init__
    async def decode_batch(self, jobs: list[PreparedJob]) -> list[DecodeOutcome]:
        started = time.monotonic()
        self.batch_sizes[len(jobs)] += 1
        self.metrics.batch_size.observe(len(jobs))
        for prepared in jobs:
            self.metrics.queue_wait.observe(started - prepared.received_at)
        outcomes = self.core.run(jobs)
        for outcome in outcomes:
            self._record(outcome)
        self._note_call(failed=any(outcome.error is not None for outcome in outcomes))
        return outcomes

    async def stream(self, job: DecodeJob) -> AsyncIterator[StreamEvent]:
        """Decode one job alone, yielding an opening event (or the error), then one per block."""
        try:
            prepared = self.core.prepare(job)
        except RequestRejected as exc:
            self.metrics.rejected.inc(tags={"kind": exc.error.kind})
            yield StreamEvent(error=exc.error)
            return
        yield StreamEvent()
        self._track(+1)
        try:
            for event in self.core.stream(prepared):  # each step decodes one block
                if event.completion is not None or event.error is not None:
                    self._record(DecodeOutcome(event.completion, event.error))
                    self._note_call(failed=event.error is not None)
                yield event
        finally:
            self._track(-1)

    def info(self) -> dict[str, Any]:
        """What the ingress reports about the model."""
        config = self.core.engine.config
        return {
            "active_params_b": self.core.active_params_b,
            "context_length": self.core.context_length,
            "presets": sorted(config.presets),
            "default_preset": config.default_preset,
        }

    def stats(self) -> dict[str, Any]:
        """Batches run by this replica, by size (the batching evidence the tests read)."""
        return {
            "batches": sum(self.batch_sizes.values()),
            "requests": sum(size * count for size, count in self.batch_sizes.items()),
            "max_batch_size": max(self.batch_sizes, default=0),
            "batch_sizes": dict(sorted(self.batch_sizes.items())),
        }

    def check_health(self) -> None:
        if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"the last {self.consecutive_failures} decoding calls failed")

    def _track(self, change: int) -> None:
        self.in_flight += change
        self.metrics.in_flight.set(self.in_flight)

    def _note_call(self, failed: bool) -> None:
        self.consecutive_failures = self.consecutive_failures + 1 if failed else 0

    def _record(self, outcome: DecodeOutcome) -> None:
        if outcome.error is not None:
            self.metrics.rejected.inc(tags={"kind": outcome.error.kind})
            return
        tags = {"strategy": outcome.completion.strategy}
        self.metrics.decode_latency.observe(outcome.completion.latency_s, tags=tags)
        self.metrics.nfe.observe(outcome.completion.nfe, tags=tags)
