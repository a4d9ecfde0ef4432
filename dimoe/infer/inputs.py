"""Inference I/O: the engine's request and result types, prompt files and prediction files.

A prompts file is JSON Lines (`.jsonl`, one object a line) or JSON (`.json`, a list of objects);
each row is one of

    {"id": "q1", "prompt": "What colour is the square?", "image": "images/q1.png"}
    {"id": "q2", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe it."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}

`image` (and an `image_url` URL) is a path relative to the prompts file's folder or a base64 data
URL. Every row is checked when read (images decoded), so a bad row fails before any decoding, with
one message naming the file, line and id. Predictions are written as JSON Lines with the fields
of `PREDICTION_FIELDS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from dimoe.data.chat import Message
from dimoe.data.formats import RecordFormatError, parse_openai_messages
from dimoe.data.images import ImageError, decode_image, load_image_bytes
from dimoe.errors import UserError
from dimoe.io import iter_jsonl, read_json, write_jsonl

PREDICTION_FIELDS = ("id", "prompt", "output", "prompt_ids", "output_ids", "nfe", "latency_s")


class InputError(UserError):
    """A prompts file or row that cannot be used; the message names the file, line and id."""


@dataclass
class Request:
    """One generation request: a `prompt` text or OpenAI-style `messages` (content a string or
    text / image_url parts), and optionally the image itself (PIL or encoded bytes), which takes
    precedence over an image_url part."""

    id: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    image: Image.Image | bytes | None = None
    # Sampling noise of this request alone (None: the settings' seed): same seed, same text, in
    # any batch.
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the output ends before the first of these; decoding stops there
    top_logprobs: int | None = None  # None: no logprobs; k: each token's, and k alternatives
    chat_template: bool = True  # False: `prompt` is decoded as it is (an OpenAI completions prompt)

    @property
    def prompt_text(self) -> str:
        """The prompt as text: `prompt`, or the last user message of `messages`."""
        if self.prompt is not None:
            return self.prompt
        messages = parse_openai_messages(self.messages)[0]
        return next((m.content for m in reversed(messages) if m.role == "user"), "")


@dataclass
class TokenLogprob:
    """A generated token's log-probability at the step it was revealed, with the `top` most likely
    tokens of that step (token text, logprob)."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Result:
    id: str
    output: str  # decoded response, cut at the first EOS or stop sequence
    prompt_ids: list[int]
    output_ids: list[int]  # generated tokens before the first EOS
    nfe: int  # forward passes that included this request
    latency_s: float  # from the start of its batch to the end of the block in which it finished
    finish_reason: str = "length"  # "stop": EOS or a stop sequence; "length": gen_length ran out
    logprobs: list[TokenLogprob] | None = None  # per output token, when the request asked


def request_conversation(
    request: Request, image_root: str | Path | None = None
) -> tuple[list[Message], Image.Image | None]:
    """The chat messages and decoded image of a request. An image_url is loaded with
    `load_image_bytes` (relative paths need `image_root`; data URLs always work).
    Raises ValueError (RecordFormatError, ImageError) naming the problem."""
    if (request.prompt is None) == (request.messages is None):
        raise UserError(f"request {request.id!r}: give exactly one of `prompt` and `messages`")
    if request.prompt is not None:
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise UserError(f"request {request.id!r}: `prompt` must be a non-empty string")
        messages, image_ref = [Message("user", request.prompt.strip())], None
    else:
        messages, image_ref = parse_openai_messages(request.messages)
    image = request.image
    if image is None and image_ref is not None:
        image = load_image_bytes(image_ref, image_root)[0]
    if isinstance(image, bytes):
        image = decode_image(image)
    return messages, image


def read_prompts(path: str | Path) -> list[Request]:
    """Read and check a prompts file (see the module docstring). Raises InputError on the first
    bad row, FileNotFoundError if the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    requests: list[Request] = []
    seen: dict[str, int] = {}
    for line, row in _rows(path):
        request = _request_of_row(row, path, line)
        if request.id in seen:
            raise InputError(f"{path}:{line}: id {request.id!r} already used on line {seen[request.id]}")
        seen[request.id] = line
        requests.append(request)
    return requests


def _rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, decoded row) pairs; for a `.json` list the number is the row's position."""
    if path.suffix == ".jsonl":
        return list(iter_jsonl(path))
    if path.suffix == ".json":
        data = read_json(path)
        if not isinstance(data, list):
            raise InputError(
                f"{path}: a .json prompts file must hold a list of rows, got {type(data).__name__}"
            )
        return list(enumerate(data, start=1))
    raise InputError(f"{path}: unsupported prompts file type {path.suffix!r}; use .jsonl or .json")


def _request_of_row(row: Any, path: Path, line: int) -> Request:
    where = f"{path}:{line}"
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    row_id = row.get("id")
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)) or str(row_id) == "":
        raise InputError(f"{where}: missing `id` (a string or integer)")
    where = f"{where} (id {row_id!r})"
    if "prompt" in row and "messages" in row:
        raise InputError(f"{where}: has both `prompt` and `messages`; keep one")
    if "messages" not in row and (not isinstance(row.get("prompt"), str) or not row["prompt"].strip()):
        raise InputError(f"{where}: missing `prompt` (a non-empty string) or `messages`")
    if "messages" in row and "image" in row:
        raise InputError(f"{where}: a `messages` row carries its image as an image_url part, not `image`")
    image_ref = row.get("image")
    try:
        if "messages" in row:
            image_ref = parse_openai_messages(row["messages"])[1]
        if image_ref is not None and not isinstance(image_ref, str):
            raise InputError(f"{where}: `image` must be a path or a data URL string, got {image_ref!r:.60}")
        image = load_image_bytes(image_ref, path.parent)[0] if image_ref is not None else None
    except ImageError as exc:
        raise InputError(f"{where}: unreadable image: {exc}") from None
    except RecordFormatError as exc:
        raise InputError(f"{where}: bad `messages`: {exc}") from None
    return Request(str(row_id), prompt=row.get("prompt"), messages=row.get("messages"), image=image)


def prediction_row(request: Request, result: Result) -> dict[str, Any]:
    return {
        "id": result.id,
        "prompt": request.prompt_text,
        "output": result.output,
        "prompt_ids": result.prompt_ids,
        "output_ids": result.output_ids,
        "nfe": result.nfe,
        "latency_s": round(result.latency_s, 6),
    }


def write_predictions(path: str | Path, requests: list[Request], results: list[Result]) -> Path:
    """Write one JSON line per request (results in request order)."""
    rows = (prediction_row(request, result) for request, result in zip(requests, results, strict=True))
    return write_jsonl(path, rows)
