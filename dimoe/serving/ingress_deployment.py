"""The Ingress deployment of the Serve application (docs/design.md §6): the HTTP API (FastAPI)
and, through `GrpcMethods`, the gRPC service.

It validates and translates requests (`dimoe.serving`), then calls the decoder deployment; it does
no model work, so it reserves no CPU and accepts many requests at once.
"""

import asyncio
import time
import uuid
from typing import Any

from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from dimoe.config.serve import LimitsConfig
from dimoe.serving.client import DecoderClient
from dimoe.serving.errors import ApiError, RequestRejected
from dimoe.serving.grpc_service import GrpcMethods
from dimoe.serving.http import BearerAuth, create_api, error_response
from dimoe.serving.jobs import DecodeJob, chat_jobs, completion_jobs, generate_job
from dimoe.serving.metrics import IngressMetrics
from dimoe.serving.responses import (
    chat_chunk,
    chat_chunks,
    chat_completion,
    generation,
    stream_sse,
    text_chunks,
    text_completion,
)
from dimoe.serving.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest, OpenAIFields

# No `from __future__ import annotations` in this module: Serve rewrites the route signatures, and
# FastAPI then needs the annotations as classes to see that `body` is the JSON body.
api = create_api()


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress(GrpcMethods):
    def __init__(
        self, decoder: DeploymentHandle, model_name: str, limits: dict[str, Any], api_key_sha256: str | None
    ) -> None:
        self.decoder = DecoderClient(decoder)
        self.model_name = model_name
        self.limits = LimitsConfig.model_validate(limits)
        self.auth = BearerAuth(api_key_sha256)
        self.metrics = IngressMetrics()
        self.started = int(time.time())
        # Read by the middlewares of `create_api`.
        api.state.limits, api.state.auth, api.state.metrics = self.limits, self.auth, self.metrics

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        self.check_model(body.model)
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        jobs = chat_jobs(body, self.limits, request_id)
        if body.stream:
            opening = chat_chunk(request_id, self.model_name, created, {"role": "assistant", "content": ""})
            return await self.stream(
                body, jobs[0], chat_chunks(request_id, self.model_name, created), opening
            )
        return chat_completion(await self.complete_all(jobs), self.model_name, created)

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Any:
        self.check_model(body.model)
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        jobs = completion_jobs(body, self.limits, request_id)
        if body.stream:
            if len(jobs) > 1:
                raise RequestRejected(
                    ApiError(400, "stream: streaming takes one prompt", "prompt", "unsupported_value")
                )
            return await self.stream(body, jobs[0], text_chunks(request_id, self.model_name, created))
        return text_completion(await self.complete_all(jobs), body.n, self.model_name, created)

    async def complete_all(self, jobs: list[DecodeJob]) -> list[Any]:
        """Every job's completion; sent together, they share the decoder's next batch."""
        return list(await asyncio.gather(*(self.decoder.complete(job) for job in jobs)))

    async def stream(
        self, body: OpenAIFields, job: DecodeJob, chunk: Any, opening: Any = None
    ) -> StreamingResponse:
        events = await self.decoder.open_stream(job)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            stream_sse(events, chunk, include_usage, opening), media_type="text/event-stream"
        )

    @api.post("/v1/generate")
    async def generate(self, body: GenerateRequest) -> Any:
        job = generate_job(body, self.limits, f"gen-{uuid.uuid4().hex}")
        return generation(await self.decoder.complete(job), self.model_name)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        model = {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "dimoe"}
        return {"object": "list", "data": [model]}

    @api.get("/healthz")
    async def healthz(self) -> Any:
        try:
            info = await self.decoder.info()
        except Exception as exc:  # any failure to reach the decoder means "not serving"
            return error_response(
                ApiError(503, f"decoder unavailable: {type(exc).__name__}", code="unhealthy")
            )
        return {"status": "ok", "model": self.model_name, **info}

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            message = f"model {model!r} not found; this server serves {self.model_name!r} (see /v1/models)"
            raise RequestRejected(ApiError(404, message, "model", "model_not_found"))
