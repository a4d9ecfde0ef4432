"""Raw conversation formats → one conversation schema.

Four raw layouts are accepted, detected per record:

- **LLaVA / ShareGPT**: ``{"id", "image"?, "system"?, "conversations": [{"from", "value"}, …]}`` with
  ``from`` in human/gpt (LLaVA) or also system/user/assistant (ShareGPT variants);
- **OpenAI messages**: ``{"id"?, "messages": [{"role", "content"}, …]}`` where ``content`` is a
  string or a list of parts ``{"type": "text", "text"}`` / ``{"type": "image_url", "image_url":
  {"url"}}``. The image part becomes the ``<image>`` placeholder at its position in the turn.
- **Plain text** (a pretraining corpus): ``{"id"?, "text"}``; the whole text is the response, with
  no prompt and no chat template.

Every problem raises :class:`RecordFormatError` with a short machine-readable ``reason`` (the
rejects table groups by it) and a message saying what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dimoe.data.chat import ChatFormatError, Message, validate_roles
from dimoe.data.tokenizer import IMAGE
from dimoe.errors import UserError

# `from` values seen in LLaVA and ShareGPT dumps, mapped to chat roles.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
# "developer" is what newer OpenAI clients send instead of "system".
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RecordFormatError(UserError):
    """A raw record that cannot become a conversation; ``reason`` is a short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Conversation:
    """A parsed record: messages in order, at most one image reference, the record's own id."""

    messages: tuple[Message, ...]
    image: str | None
    record_id: str | None
    split: str | None
    format: str  # "llava", "sharegpt" or "openai"

    def messages_json(self) -> str:
        """Canonical JSON of the messages (the `messages` column of normalized data)."""
        return json.dumps([{"role": m.role, "content": m.content} for m in self.messages], ensure_ascii=False)


def parse_record_text(text: str) -> Conversation:
    """Parse one raw record given as JSON text."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordFormatError("bad_json", f"not valid JSON: {exc}") from None
    return parse_record(record)


def parse_record(record: Any) -> Conversation:
    """Parse one raw record (already decoded JSON) of any supported format."""
    if not isinstance(record, dict):
        raise RecordFormatError(
            "not_an_object", f"a record must be a JSON object, got {type(record).__name__}"
        )
    if "messages" in record and "conversations" in record:
        raise RecordFormatError(
            "ambiguous_format", "record has both `messages` and `conversations`; keep one"
        )
    if "messages" in record:
        messages, image = parse_openai_messages(record["messages"])
        fmt = "openai"
    elif "conversations" in record:
        messages = _parse_sharegpt(record["conversations"], record.get("system"))
        image = _record_image(record)
        fmt = "llava" if image is not None else "sharegpt"
    elif "text" in record:
        return _parse_text(record)
    else:
        raise RecordFormatError(
            "unknown_format",
            "record has neither `conversations` (LLaVA/ShareGPT), `messages` (OpenAI) nor `text`; "
            f"keys: {sorted(record)[:10]}",
        )
    _check_turns(messages)
    return Conversation(
        tuple(messages), image, _optional_str(record, "id"), _optional_str(record, "split"), fmt
    )


def _parse_text(record: dict[str, Any]) -> Conversation:
    text = record["text"]
    if not isinstance(text, str) or not text.strip():
        raise RecordFormatError("empty_text", "`text` must be a non-empty string")
    if record.get("image") is not None:
        raise RecordFormatError("text_with_image", "a plain-text record has no image; use `messages` for one")
    message = Message("assistant", text)
    return Conversation((message,), None, _optional_str(record, "id"), _optional_str(record, "split"), "text")


def parse_openai_messages(messages: Any) -> tuple[list[Message], str | None]:
    """OpenAI chat `messages` → chat messages (an image part becomes the `<image>` placeholder)
    and the image part's URL, if any. Shared with inference and serving requests."""
    return _parse_openai(messages), _single_image_from_parts(messages)


def _parse_sharegpt(turns: Any, system: Any) -> list[Message]:
    if not isinstance(turns, list):
        raise RecordFormatError("bad_turn", f"`conversations` must be a list, got {type(turns).__name__}")
    messages = []
    if system is not None:
        if not isinstance(system, str):
            raise RecordFormatError("bad_turn", f"`system` must be a string, got {type(system).__name__}")
        if system.strip():
            messages.append(Message("system", system.strip()))
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RecordFormatError(
                "bad_turn", f"turn {i}: expected {{'from': …, 'value': <string>}}, got {turn!r:.80}"
            )
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise RecordFormatError(
                "unknown_role",
                f"turn {i}: unknown role {turn.get('from')!r}; expected one of {sorted(SHAREGPT_ROLES)}",
            )
        messages.append(Message(role, turn["value"].strip()))
    return messages


def _parse_openai(turns: Any) -> list[Message]:
    if not isinstance(turns, list):
        raise RecordFormatError("bad_turn", f"`messages` must be a list, got {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordFormatError("bad_turn", f"message {i}: expected an object, got {turn!r:.80}")
        role = OPENAI_ROLES.get(turn.get("role"))
        if role is None:
            raise RecordFormatError(
                "unknown_role",
                f"message {i}: unknown role {turn.get('role')!r}; expected one of {sorted(OPENAI_ROLES)}",
            )
        messages.append(Message(role, _openai_content_text(turn.get("content"), i)))
    return messages


def _openai_content_text(content: Any, index: int) -> str:
    """Flatten OpenAI content to text, the image part becoming the `<image>` placeholder."""
    if isinstance(content, str):
        return content.strip()
    if not isinstance(content, list):
        raise RecordFormatError(
            "bad_turn", f"message {index}: `content` must be a string or a list of parts, got {content!r:.80}"
        )
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"].strip())
        elif kind == "image_url":
            pieces.append(IMAGE)
        else:
            raise RecordFormatError(
                "unsupported_content",
                f"message {index}: unsupported content part {part!r:.80}; expected type text or image_url",
            )
    return "\n".join(p for p in pieces if p)


def _single_image_from_parts(turns: list[Any]) -> str | None:
    urls = []
    for turn in turns:
        content = turn.get("content")
        for part in content if isinstance(content, list) else []:
            if part.get("type") == "image_url":
                urls.append(_image_url(part))
    return _at_most_one(urls)


def _image_url(part: dict[str, Any]) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value  # some clients send the URL string directly
    if not isinstance(url, str) or not url:
        raise RecordFormatError("bad_image_ref", f"image_url part without a URL string: {part!r:.80}")
    return url


def _record_image(record: dict[str, Any]) -> str | None:
    if "image" in record and "images" in record:
        raise RecordFormatError("ambiguous_format", "record has both `image` and `images`; keep one")
    refs = record.get("images", [record["image"]] if record.get("image") is not None else [])
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        raise RecordFormatError(
            "bad_image_ref", f"image reference must be a non-empty string, got {refs!r:.80}"
        )
    return _at_most_one(refs)


def _at_most_one(refs: list[str]) -> str | None:
    if len(refs) > 1:
        raise RecordFormatError(
            "multiple_images", f"{len(refs)} images in one record; DiMoE-VL takes at most one"
        )
    return refs[0] if refs else None


def _check_turns(messages: list[Message]) -> None:
    """Structural checks with their own reasons; the role order is checked by the chat template."""
    turns = [m for m in messages if m.role != "system"]
    if not turns:
        raise RecordFormatError("empty_conversation", "the conversation has no user or assistant turn")
    if turns[-1].role != "assistant" or not turns[-1].content:
        raise RecordFormatError("no_response", "the conversation must end with a non-empty assistant turn")
    try:
        validate_roles(messages, needs_response=True)
    except ChatFormatError as exc:
        raise RecordFormatError("bad_roles", str(exc)) from None


def _optional_str(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordFormatError(f"bad_{key}", f"`{key}` must be a string or an integer, got {value!r:.80}")
    return str(value)
