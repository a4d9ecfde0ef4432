"""Completions → response bodies: OpenAI chat completions (whole or as SSE chunks) and the native
`/v1/generate` body. Every body carries a `dimoe` object with the decoding cost."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from dimoe.serving.jobs import Completion, StreamEvent

SSE_DONE = "data: [DONE]\n\n"


def usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def decoding_stats(completion: Completion) -> dict[str, Any]:
    return {
        "nfe": completion.nfe,
        "latency_s": round(completion.latency_s, 6),
        "nfe_x_active_params_b": completion.nfe_x_active_params_b,
        "strategy": completion.strategy,
    }


def chat_completion(completion: Completion, model: str, created: int) -> dict[str, Any]:
    return {
        "id": completion.id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason,
            }
        ],
        "usage": usage(completion),
        "dimoe": decoding_stats(completion),
    }


def chat_chunk(
    request_id: str, model: str, created: int, delta: dict[str, str], finish_reason: str | None = None
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def generation(completion: Completion, model: str) -> dict[str, Any]:
    return {
        "id": completion.id,
        "object": "dimoe.generation",
        "model": model,
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "usage": usage(completion),
        "dimoe": decoding_stats(completion),
    }


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def chat_sse(
    events: AsyncIterator[StreamEvent], request_id: str, model: str, created: int, include_usage: bool
) -> AsyncIterator[str]:
    """The SSE body of a streamed chat completion: the role, one content chunk per committed block,
    a closing chunk with the finish reason (and the `dimoe` stats), optionally a usage chunk, then
    `[DONE]`. A failure after the stream started is sent as an error event, as OpenAI does."""
    yield sse(chat_chunk(request_id, model, created, {"role": "assistant", "content": ""}))
    async for event in events:
        if event.error is not None:
            yield sse(event.error.body())
            break
        if event.delta:
            yield sse(chat_chunk(request_id, model, created, {"content": event.delta}))
        if event.completion is not None:
            closing = chat_chunk(request_id, model, created, {}, event.completion.finish_reason)
            closing["dimoe"] = decoding_stats(event.completion)
            yield sse(closing)
            if include_usage:
                yield sse(
                    {
                        **chat_chunk(request_id, model, created, {}),
                        "choices": [],
                        "usage": usage(event.completion),
                    }
                )
    yield SSE_DONE
