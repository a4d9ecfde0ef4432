"""The gRPC service of dimoe/serving/proto/dimoe.proto, as methods of the ingress deployment.

Serve's gRPC proxy (`add_DiMoEServicer_to_server` registered in `gRPCOptions`) calls the ingress
method named like the RPC. A refused call ends with the matching gRPC status and the error's
message as details; requests are validated by the same schema as `POST /v1/generate`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, NoReturn

from pydantic import ValidationError
from ray.serve.grpc_util import RayServegRPCContext

from dimoe.serving.errors import ApiError, RequestRejected, validation_error
from dimoe.serving.jobs import Completion, DecodeJob, generate_job
from dimoe.serving.proto import dimoe_pb2 as pb2
from dimoe.serving.schemas import GenerateRequest

OPTIONAL_FIELDS = (
    "strategy",
    "steps",
    "gen_length",
    "block_length",
    "threshold",
    "temperature",
    "seed",
    "cache",
)


class GrpcMethods:
    """Mixed into the ingress, which provides `auth`, `limits`, `metrics`, `model_name` and
    `decoder` (a DecoderClient)."""

    async def Generate(
        self, request: pb2.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> pb2.GenerateResponse:
        try:
            completion = await self.decoder.complete(self.grpc_job(request, grpc_context))
        except RequestRejected as exc:
            self.fail(grpc_context, "Generate", exc.error)
            return pb2.GenerateResponse()
        self.metrics.request("Generate", "grpc", 200)
        return response_message(completion)

    async def GenerateStream(
        self, request: pb2.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb2.GenerateChunk]:
        try:
            job = self.grpc_job(request, grpc_context)
            events = await self.decoder.open_stream(job)
        except RequestRejected as exc:
            self.end_stream(grpc_context, exc.error)
        async for event in events:
            if event.error is not None:
                self.end_stream(grpc_context, event.error)
            done = event.completion is not None
            result = response_message(event.completion) if done else None
            yield pb2.GenerateChunk(
                id=job.request.id, block=event.block, delta=event.delta, done=done, result=result
            )
        self.metrics.request("GenerateStream", "grpc", 200)

    async def Health(
        self, request: pb2.HealthRequest, grpc_context: RayServegRPCContext
    ) -> pb2.HealthResponse:
        try:
            await self.decoder.info()
        except Exception:  # any failure to reach the decoder means "not serving"
            return pb2.HealthResponse(ok=False, model=self.model_name)
        return pb2.HealthResponse(ok=True, model=self.model_name)

    def grpc_job(self, request: pb2.GenerateRequest, grpc_context: RayServegRPCContext) -> DecodeJob:
        metadata = dict(grpc_context.invocation_metadata())
        self.auth.check(metadata.get("authorization"))
        fields: dict[str, Any] = {
            name: getattr(request, name) for name in OPTIONAL_FIELDS if request.HasField(name)
        }
        try:
            body = GenerateRequest(prompt=request.prompt, preset=request.preset or None, **fields)
        except ValidationError as exc:
            raise RequestRejected(validation_error(exc.errors())) from None
        return generate_job(body, self.limits, f"gen-{uuid.uuid4().hex}", image=request.image or None)

    def end_stream(self, grpc_context: RayServegRPCContext, error: ApiError) -> NoReturn:
        """A stream that simply returns ends with OK whatever code is set; an exception makes Serve
        end it with the code set. The exception is a builtin so that the proxy, which unpickles it,
        need not import the serving modules (seconds, for torch): it imports only the stubs."""
        self.fail(grpc_context, "GenerateStream", error)
        raise RuntimeError(error.message)

    def fail(self, grpc_context: RayServegRPCContext, rpc: str, error: ApiError) -> None:
        grpc_context.set_code(error.grpc_status)
        grpc_context.set_details(error.message)
        self.metrics.request(rpc, "grpc", error.status)


def response_message(completion: Completion) -> pb2.GenerateResponse:
    return pb2.GenerateResponse(
        id=completion.id,
        text=completion.text,
        finish_reason=completion.finish_reason,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        nfe=completion.nfe,
        latency_s=completion.latency_s,
        nfe_x_active_params_b=completion.nfe_x_active_params_b,
    )
