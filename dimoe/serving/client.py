"""The ingress's calls to the decoder deployment, with Serve's failures mapped to API errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.exceptions import BackPressureError

from dimoe.serving.errors import RequestRejected, overloaded
from dimoe.serving.jobs import Completion, DecodeJob, StreamEvent

QUEUE_FULL = "the decoder's queue is full; retry shortly"
INFO_TIMEOUT_S = 5.0


class DecoderClient:
    """Wraps the decoder's DeploymentHandle (anything with its `generate`/`stream` methods)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def info(self, timeout_s: float = INFO_TIMEOUT_S) -> dict[str, Any]:
        """The decoder's model facts; raises if it does not answer in time (a health probe)."""
        return await asyncio.wait_for(self.handle.info.remote(), timeout_s)

    async def complete(self, job: DecodeJob) -> Completion:
        """Decode `job` in the decoder's next batch; RequestRejected with its error, 503 when the
        decoder's queue is full (its `max_queued_requests`)."""
        try:
            outcome = await self.handle.generate.remote(job)
        except BackPressureError:
            raise overloaded(QUEUE_FULL) from None
        if outcome.error is not None:
            raise RequestRejected(outcome.error)
        return outcome.completion

    async def open_stream(self, job: DecodeJob) -> AsyncIterator[StreamEvent]:
        """Start streaming `job`. Errors found before decoding starts raise RequestRejected here,
        while the caller can still answer with a plain error response."""
        events = self.handle.options(stream=True).stream.remote(job)
        try:
            opening = await events.__anext__()
        except BackPressureError:
            raise overloaded(QUEUE_FULL) from None
        if opening.error is not None:
            raise RequestRejected(opening.error)
        return events
