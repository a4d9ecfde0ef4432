"""Request bodies of the HTTP API, validated by pydantic; unknown fields are errors.

`POST /v1/chat/completions` and `POST /v1/completions` take OpenAI's documented request fields
plus the DiMoE extension fields of `DecodeFields`; an OpenAI client sends the extensions with
`extra_body={"preset": "fast", "steps": 8}`. Of OpenAI's fields (`OpenAIFields`):

- honoured: `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `n`,
  `stop`, `stream` with `stream_options.include_usage`, `logprobs` / `top_logprobs`;
- accepted with no effect, as nothing in this decoder corresponds: `user`, `metadata`, `store`,
  `service_tier`, `parallel_tool_calls`, zero penalties, `response_format` `{"type": "text"}`,
  `tool_choice: "none"`;
- refused with a 400 naming the field, rather than answered wrongly: `tools`, `functions`,
  a `response_format` with a schema, a non-empty `logit_bias`, non-zero penalties, `echo`,
  `suffix`, `best_of` > 1.

`POST /v1/generate` is the native form: a prompt, an optional base64 image and every decoding field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_N = 16  # choices per request: a whole batch at most
MAX_TOP_LOGPROBS = 20


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
    top_k: int | None = Field(None, ge=0)  # vLLM's extension: sample among the k most likely tokens


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


class ResponseFormat(Wire):
    type: str
    json_schema: dict[str, Any] | None = None


class OpenAIFields(DecodeFields):
    """The request fields /v1/chat/completions and /v1/completions share (module docstring)."""

    model: str
    max_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _honourable(self) -> OpenAIFields:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name}: non-zero penalties are not supported by a diffusion decoder")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported; send an empty object or leave it out")
        if len(self.stop_sequences) > MAX_STOP or any(not s for s in self.stop_sequences):
            raise ValueError(f"stop: at most {MAX_STOP} non-empty strings")
        return self

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)  # newer OpenAI name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _chat_honourable(self) -> ChatCompletionRequest:
        if self.tools or self.functions:
            raise ValueError("tools: tool calling is not supported by this model")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice: tool calling is not supported by this model")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: only {'type': 'text'} is supported (no JSON mode or schema)")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self


class CompletionRequest(OpenAIFields):
    """`POST /v1/completions`: the prompt is sent as it is (no chat template)."""

    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)  # OpenAI: the number of alternatives, up to 5
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _completion_honourable(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo: returning the prompt is not supported")
        if self.suffix:
            raise ValueError("suffix: insertion is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only 1 is supported; use n for several choices")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class GenerateRequest(DecodeFields):
    id: str | None = Field(None, min_length=1, max_length=128)
    prompt: str = Field(min_length=1)
    image: str | None = None  # base64 of an encoded image, or a data:image/...;base64, URL
    gen_length: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0.0)
    # The rest of DecodeSettings, so that a client (`dimoe eval run --serve-url`) can fix every knob.
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    remasking: str | None = None
    cfg_scale: float | None = Field(None, ge=0.0)
    cap_start_ratio: float | None = Field(None, gt=0.0, le=1.0)
    cap_end_ratio: float | None = Field(None, gt=0.0, le=1.0)
    max_decode_per_step: int | None = Field(None, ge=0)
