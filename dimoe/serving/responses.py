"""Completions → response bodies: OpenAI chat completions and text completions (whole or as SSE
chunks) and the native `/v1/generate` body. Every body carries a `dimoe` object with the decoding
cost (of its first choice). Logprobs are each token's probability under the model at the step it
was revealed, with that step's most likely alternatives: a diffusion decoder's counterpart of an
autoregressive model's next-token logprobs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from dimoe.infer.inputs import TokenLogprob
from dimoe.serving.jobs import Completion, StreamEvent

SSE_DONE = "data: [DONE]\n\n"


def usage(completions: list[Completion], n: int = 1) -> dict[str, int]:
    """Every choice's generated tokens, and each prompt's tokens once: `completions` holds `n`
    consecutive choices per prompt."""
    prompt = sum(c.prompt_tokens for c in completions[::n])
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def decoding_stats(completion: Completion) -> dict[str, Any]:
    return {
        "nfe": completion.nfe,
        "latency_s": round(completion.latency_s, 6),
        "nfe_x_active_params_b": completion.nfe_x_active_params_b,
        "strategy": completion.strategy,
    }


def chat_completion(completions: list[Completion], model: str, created: int) -> dict[str, Any]:
    first = completions[0]
    choices = []
    for index, completion in enumerate(completions):
        choice = {
            "index": index,
            "message": {"role": "assistant", "content": completion.text},
            "finish_reason": completion.finish_reason,
            "logprobs": None,
        }
        if completion.logprobs is not None:
            choice["logprobs"] = {"content": [chat_logprob(t) for t in completion.logprobs], "refusal": None}
        choices.append(choice)
    return {
        "id": first.id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(completions, len(completions)),
        "dimoe": decoding_stats(first),
    }


def chat_logprob(token: TokenLogprob) -> dict[str, Any]:
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {**entry(token.token, token.logprob), "top_logprobs": [entry(t, lp) for t, lp in token.top]}


def text_completion(completions: list[Completion], n: int, model: str, created: int) -> dict[str, Any]:
    """`/v1/completions`: choice i is choice i % n of prompt i // n."""
    choices = [
        {"index": index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": completion_logprobs(c)}
        for index, c in enumerate(completions)
    ]
    return {
        "id": completions[0].id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(completions, n),
        "dimoe": decoding_stats(completions[0]),
    }


def completion_logprobs(completion: Completion) -> dict[str, Any] | None:
    """The legacy completions shape: parallel lists of tokens, logprobs, alternatives, offsets."""
    if completion.logprobs is None:
        return None
    tokens = completion.logprobs
    offsets = [sum(len(t.token) for t in tokens[:i]) for i in range(len(tokens))]
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
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
        "usage": usage([completion]),
        "dimoe": decoding_stats(completion),
    }


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


ChunkFn = Callable[[str | None, str | None], dict[str, Any]]  # (text delta, finish reason) → chunk


def chat_chunks(request_id: str, model: str, created: int) -> ChunkFn:
    def chunk(delta: str | None, finish_reason: str | None) -> dict[str, Any]:
        return chat_chunk(request_id, model, created, {"content": delta} if delta else {}, finish_reason)

    return chunk


def text_chunks(request_id: str, model: str, created: int) -> ChunkFn:
    def chunk(delta: str | None, finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}
        return {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
        }

    return chunk


async def stream_sse(
    events: AsyncIterator[StreamEvent],
    chunk: ChunkFn,
    include_usage: bool,
    opening: dict[str, Any] | None = None,
) -> AsyncIterator[str]:
    """The SSE body of a streamed completion: the `opening` chunk if any (chat sends the role), one
    chunk per committed block, a closing chunk with the finish reason (and the `dimoe` stats),
    optionally a usage chunk, then `[DONE]`. A failure after the stream started is sent as an
    error event, as OpenAI does."""
    if opening is not None:
        yield sse(opening)
    async for event in events:
        if event.error is not None:
            yield sse(event.error.body())
            break
        if event.delta:
            yield sse(chunk(event.delta, None))
        if event.completion is not None:
            closing = chunk(None, event.completion.finish_reason)
            closing["dimoe"] = decoding_stats(event.completion)
            yield sse(closing)
            if include_usage:
                yield sse({**chunk(None, None), "choices": [], "usage": usage([event.completion])})
    yield SSE_DONE
