"""Validated request bodies → decode jobs for the decoder, and the values it sends back.

The ingress turns a body into a `DecodeJob` (images checked against the limits here, so bad bytes
never reach the decoder); the decoder resolves the job's settings against its presets
(`fit_settings`) and answers with a `DecodeOutcome` or, when streaming, `StreamEvent`s. All of
these are plain dataclasses: they cross process boundaries through Ray.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, replace
from typing import Any

from dimoe.config.infer import DecodeSettings, InferConfig
from dimoe.config.loader import ConfigError
from dimoe.config.serve import LimitsConfig
from dimoe.data.images import ImageError, read_image_ref, verify_image
from dimoe.infer.inputs import Request, TokenLogprob
from dimoe.serving.errors import ApiError, bad_request
from dimoe.serving.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DecodeFields,
    GenerateRequest,
    OpenAIFields,
)

# Stands in for an image_url once its bytes travel in `Request.image` (which takes precedence), so
# that the placeholder keeps its place in the message without shipping the data URL twice.
ATTACHED_IMAGE = "attached:image"


@dataclass(frozen=True)
class DecodeJob:
    """One request for the decoder: what to decode and the caller's explicit decoding fields."""

    request: Request
    preset: str | None = None
    overrides: dict[str, Any] | None = None  # DecodeSettings fields (gen_length included)


@dataclass(frozen=True)
class Completion:
    id: str
    text: str
    finish_reason: str  # "stop": the model ended the answer; "length": gen_length ran out
    prompt_tokens: int
    completion_tokens: int
    nfe: int
    latency_s: float
    nfe_x_active_params_b: float
    strategy: str
    logprobs: list[TokenLogprob] | None = None  # per output token, when asked


@dataclass(frozen=True)
class DecodeOutcome:
    """The decoder's answer to one job: a completion or the error to send back."""

    completion: Completion | None = None
    error: ApiError | None = None


@dataclass(frozen=True)
class StreamEvent:
    """An item of a decoder stream: first an opening event (block None) or an error that ends it,
    then one per committed block with the text added by it; the last carries the completion."""

    block: int | None = None
    delta: str = ""
    completion: Completion | None = None
    error: ApiError | None = None


def chat_jobs(body: ChatCompletionRequest, limits: LimitsConfig, request_id: str) -> list[DecodeJob]:
    """An OpenAI chat request as its `n` jobs; RequestRejected for a limit or an unusable image."""
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise bad_request("give one of max_tokens and max_completion_tokens", param="max_tokens")
    gen_length = body.max_completion_tokens or body.max_tokens
    messages, image = chat_messages(body.messages, limits)
    top = (body.top_logprobs or 0) if body.logprobs else None
    request = Request(request_id, messages=messages, image=image, top_logprobs=top)
    return choice_jobs(body, request, gen_length, limits)


def completion_jobs(body: CompletionRequest, limits: LimitsConfig, request_id: str) -> list[DecodeJob]:
    """An OpenAI completions request as `n` jobs per prompt, prompt-major; the prompt is decoded
    as it is, without the chat template."""
    gen_length = body.max_tokens or 16  # OpenAI's default for /v1/completions
    jobs = []
    for prompt in body.prompts:
        request = Request(request_id, prompt=prompt, chat_template=False, top_logprobs=body.logprobs)
        jobs += choice_jobs(body, request, gen_length, limits)
    return jobs


def choice_jobs(
    body: OpenAIFields, request: Request, gen_length: int | None, limits: LimitsConfig
) -> list[DecodeJob]:
    """The `n` jobs of one prompt. Choice i samples with seed + i (seed default 0, or the preset's
    for a single choice), so the same seed gives the same choices; `stream` takes one choice."""
    check_gen_length(gen_length, limits, "max_tokens")
    if body.stream and body.n > 1:
        raise bad_request("stream: streaming takes n = 1; send n requests instead", "n", "unsupported_value")
    overrides = decode_overrides(body, gen_length=gen_length, temperature=body.temperature, top_p=body.top_p)
    seeds = [None if body.seed is None and body.n == 1 else (body.seed or 0) + i for i in range(body.n)]
    return [
        DecodeJob(replace(request, seed=seed, stop=body.stop_sequences), body.preset, overrides)
        for seed in seeds
    ]


# The DecodeSettings fields only the native request carries (the OpenAI ones map theirs).
NATIVE_ONLY_FIELDS = {"gen_length", "temperature", "top_p", "remasking", "cfg_scale", "cap_start_ratio",
                      "cap_end_ratio", "max_decode_per_step"}  # fmt: skip


def generate_job(
    body: GenerateRequest, limits: LimitsConfig, request_id: str, image: bytes | None = None
) -> DecodeJob:
    """A native request as a job. The image comes base64 in the body (HTTP) or as `image` bytes
    (gRPC)."""
    check_gen_length(body.gen_length, limits, "gen_length")
    if body.image is not None:
        image = decode_base64_image(body.image, limits)
    elif image:
        image = check_image(image, limits, "image")
    overrides = decode_overrides(body, **body.model_dump(include=NATIVE_ONLY_FIELDS))
    request = Request(body.id or request_id, prompt=body.prompt, image=image or None, seed=body.seed)
    return DecodeJob(request, body.preset, overrides)


def decode_overrides(fields: DecodeFields, **extra: Any) -> dict[str, Any]:
    """The decoding fields the caller set (None = keep the preset's). The seed is not one of them:
    it belongs to the request (`Request.seed`), so requests with different seeds share batches."""
    given = fields.model_dump(include={"strategy", "steps", "block_length", "threshold", "cache", "top_k"})
    return {key: value for key, value in {**given, **extra}.items() if value is not None}


def check_gen_length(gen_length: int | None, limits: LimitsConfig, param: str) -> None:
    if gen_length is not None and gen_length > limits.max_tokens:
        raise bad_request(
            f"{param}={gen_length} exceeds this server's limit of {limits.max_tokens} tokens",
            param=param,
            code="max_tokens_exceeded",
        )


def chat_messages(
    messages: list[ChatMessage], limits: LimitsConfig
) -> tuple[list[dict[str, Any]], bytes | None]:
    """OpenAI messages as the engine's message dicts, and the one image's verified bytes."""
    out: list[dict[str, Any]] = []
    image: bytes | None = None
    for i, message in enumerate(messages):
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(message.content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            param = f"messages.{i}.content.{j}.image_url.url"
            if image is not None:
                raise bad_request("DiMoE-VL takes at most one image per request", param, "multiple_images")
            image = image_from_url(part.image_url.url, limits, param)
            parts.append({"type": "image_url", "image_url": {"url": ATTACHED_IMAGE}})
        out.append({"role": message.role, "content": parts})
    return out, image


def image_from_url(url: str, limits: LimitsConfig, param: str) -> bytes:
    """The bytes of a `data:image/...;base64,` URL. Nothing is fetched: the server must not reach
    the network or read files on a client's behalf."""
    if not url.startswith("data:"):
        remote = "://" in url
        raise bad_request(
            f"image_url {url[:60]!r}: "
            + ("this server does not fetch remote images; " if remote else "")
            + "send the image inline as a data URL (data:image/png;base64,...)",
            param,
            "remote_image_url" if remote else "invalid_image_url",
        )
    try:
        data = read_image_ref(url, None, max_bytes=limits.max_image_bytes)
    except ImageError as exc:
        raise bad_request(str(exc), param, exc.reason) from None
    return check_image(data, limits, param)


def decode_base64_image(value: str, limits: LimitsConfig) -> bytes:
    """A native request's `image`: plain base64 or a data URL."""
    if value.startswith("data:"):
        return image_from_url(value, limits, "image")
    if len(value) * 3 // 4 > limits.max_image_bytes:
        raise bad_request(
            f"image is larger than the limit of {limits.max_image_bytes} bytes", "image", "image_too_large"
        )
    try:
        data = base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise bad_request(f"image is not valid base64: {exc}", "image", "bad_image_ref") from None
    return check_image(data, limits, "image")


def check_image(data: bytes, limits: LimitsConfig, param: str) -> bytes:
    """`data` if it is a complete image of an allowed format within the limits."""
    if len(data) > limits.max_image_bytes:
        raise bad_request(
            f"image is {len(data)} bytes, more than the limit of {limits.max_image_bytes}",
            param,
            "image_too_large",
        )
    try:
        verify_image(data, max_pixels=limits.max_image_pixels)
    except ImageError as exc:
        raise bad_request(str(exc), param, exc.reason) from None
    return data


def fit_settings(config: InferConfig, preset: str | None, overrides: dict[str, Any] | None) -> DecodeSettings:
    """The preset's settings with the caller's overrides, the preset's schedule fitted to the
    caller's gen_length (an OpenAI client's max_tokens; see InferConfig.resolve); a bad preset or
    field is a 400 naming it."""
    name = preset or config.default_preset
    try:
        config.preset(name)
    except ValueError as exc:
        raise bad_request(str(exc), "preset", "unknown_preset") from None
    try:
        return config.resolve(name, overrides)
    except ConfigError as exc:
        raise bad_request(str(exc), code="invalid_decode_settings") from None
