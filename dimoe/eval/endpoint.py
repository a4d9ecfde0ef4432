"""Decoding an evaluation through a served model: `dimoe eval run --serve-url URL`.

The rows and prompts are the in-process runner's (`dimoe.eval.runner`); each prompt goes to the
server's native `POST /v1/generate` (with its image inline) carrying every field of the run's
decoding settings, so the server decodes what an in-process actor would and the outputs, scores
and files are the same. Requests are sent `concurrency` at a time, which lets the server batch
them; a server that is overloaded (429/503) is retried with backoff, any other refusal is an error
naming the row.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from dimoe.config.infer import DecodeSettings
from dimoe.errors import UserError

if TYPE_CHECKING:
    from dimoe.eval.runner import PreparedTask

RETRIED_STATUSES = frozenset({429, 503})
RETRIES = 5


class Endpoint:
    """A running `dimoe infer serve` (or RayService) at `url`, e.g. http://127.0.0.1:8000."""

    def __init__(self, url: str, api_key: str | None = None, concurrency: int = 16, timeout_s: float = 600):
        if concurrency < 1:
            raise UserError(f"concurrency must be >= 1, got {concurrency}")
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.concurrency = concurrency
        self.timeout_s = timeout_s

    def info(self) -> dict[str, Any]:
        """The server's /healthz: the served model's name, active parameters and presets. The key
        is checked here too (on /v1/models; /healthz is open), before any row is sent."""
        health = self._get("/healthz")
        self._get("/v1/models")
        return health

    def _get(self, path: str) -> dict[str, Any]:
        try:
            response = httpx.get(f"{self.url}{path}", headers=self.headers, timeout=30)
        except httpx.HTTPError as exc:
            raise UserError(
                f"cannot reach the server at {self.url}: {exc}; is `dimoe infer serve` running?"
            ) from None
        if response.status_code == 401:
            raise UserError(f"{self.url} answered 401 (API key refused): pass --api-key or set DIMOE_API_KEY")
        if response.status_code != 200:
            raise UserError(f"{self.url}{path} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def decode(
        self, pending: list[PreparedTask], settings: dict[str, DecodeSettings]
    ) -> Iterator[tuple[PreparedTask, dict[str, dict]]]:
        """Each task's outputs by row id, task after task, as the in-process `_decode` yields them.
        A row's `decode_s` is its share of the task's wall time, so tokens/s is the server's
        throughput as this client saw it."""
        for prepared in pending:
            started = time.perf_counter()
            outputs = asyncio.run(self._decode_task(prepared, settings[prepared.name]))
            share = (time.perf_counter() - started) / len(outputs)
            for output in outputs.values():
                output["decode_s"] = share
            yield prepared, outputs

    async def _decode_task(self, prepared: PreparedTask, settings: DecodeSettings) -> dict[str, dict]:
        slots = asyncio.Semaphore(self.concurrency)
        fields = settings.model_dump()
        async with httpx.AsyncClient(
            base_url=self.url, headers=self.headers, timeout=self.timeout_s
        ) as client:

            async def one(row_id: str, prompt: dict[str, str]) -> tuple[str, dict]:
                async with slots:  # images are read only when their request is sent
                    body = {"id": row_id, "prompt": prompt["prompt"], **fields}
                    if prompt.get("image"):
                        body["image"] = base64.b64encode(Path(prompt["image"]).read_bytes()).decode()
                    answer = await self._post(client, body, f"task {prepared.name}, row {row_id}")
                return row_id, {
                    "output": answer["text"],
                    "output_tokens": answer["usage"]["completion_tokens"],
                    "nfe": answer["dimoe"]["nfe"],
                    "latency_s": answer["dimoe"]["latency_s"],
                }

            calls = (
                one(row["id"], prompt) for row, prompt in zip(prepared.rows, prepared.prompts, strict=True)
            )
            return dict(await asyncio.gather(*calls))

    async def _post(self, client: httpx.AsyncClient, body: dict[str, Any], what: str) -> dict[str, Any]:
        """POST /v1/generate; retried while the server is overloaded, an error naming `what` else."""
        for attempt in range(RETRIES + 1):
            try:
                response = await client.post("/v1/generate", json=body)
            except httpx.HTTPError as exc:
                raise UserError(f"{what}: the request to {self.url} failed: {exc!r}") from None
            if response.status_code == 200:
                return response.json()
            if response.status_code not in RETRIED_STATUSES or attempt == RETRIES:
                break
            await asyncio.sleep(min(2.0**attempt, 30.0))
        message = response.text[:500]
        raise UserError(f"{what}: the server answered {response.status_code}: {message}")
