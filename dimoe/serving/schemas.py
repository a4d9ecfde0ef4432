"""Request bodies of the HTTP API, validated by pydantic; unknown fields are errors.

`POST /v1/chat/completions` takes OpenAI's chat fields (those this server can honour) plus the
DiMoE extension fields of `DecodeFields`; an OpenAI client sends the extensions with
`extra_body={"preset": "fast", "steps": 8}`. `POST /v1/generate` is the native form: a prompt,
an optional base64 image and the same decoding fields.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DecodeFields(Wire):
    """Decoding knobs over the preset; unset fields keep the preset's value."""

    preset: str | None = None
    strategy: str | None = None  # threshold or llada
    steps: int | None = Field(None, gt=0)
    block_length: int | None = Field(None, gt=0)
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    cache: str | None = None  # none, prefix or block (docs/design.md §5)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # torch's generator takes at most 64 bits


class ImageURL(Wire):
    url: str
    detail: str | None = None  # accepted for compatibility; images are always resized to the model's size


class TextPart(Wire):
    type: Literal["text"]
    text: str


class ImagePart(Wire):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(Wire):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(Wire):
    include_usage: bool = False


class ChatCompletionRequest(DecodeFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)  # newer OpenAI name of max_tokens
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request
    user: str | None = None


class GenerateRequest(DecodeFields):
    id: str | None = Field(None, min_length=1, max_length=128)
    prompt: str = Field(min_length=1)
    image: str | None = None  # base64 of an encoded image, or a data:image/...;base64, URL
    gen_length: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0.0)
