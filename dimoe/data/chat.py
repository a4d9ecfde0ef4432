"""Chat encoding: a conversation (+ image) → input ids with the prompt/response boundary.

Conversations render through the tokenizer's own Jinja `chat_template` (`apply_chat_template`), so
a published Instruct tokenizer keeps its instruction format; the project's tokenizer carries
`dimoe.data.tokenizer.CHAT_TEMPLATE`::

    [<|system|>system text]<|user|>[<image>×N] user text<|assistant|>answer<|eos|>…

The prompt is the rendering of every turn before the last assistant turn with
`add_generation_prompt=True`; the response is what the full rendering adds after it (what the
diffusion loss supervises and what decoding generates), ending with `eos_token` (appended when the
template ends a turn with another marker, because decoding stops at EOS). The `<image>`
placeholder expands to `num_image_tokens` copies of the image token, so the model can write the
projected vision features at exactly those positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from dimoe.data.tokenizer import IMAGE
from dimoe.errors import UserError

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class EncodedChat:
    input_ids: list[int]
    prompt_length: int  # tokens before the response (image tokens included)
    num_image_tokens: int

    @property
    def answer_length(self) -> int:
        return len(self.input_ids) - self.prompt_length


class ChatFormatError(UserError):
    """A conversation that cannot be encoded (wrong roles, no response, misplaced image)."""


def validate_roles(messages: list[Message], *, needs_response: bool) -> None:
    if not messages:
        raise ChatFormatError("empty conversation")
    turns = [m for m in messages if m.role != "system"]
    if any(m.role == "system" for m in messages[1:]):
        raise ChatFormatError("a system message may only come first")
    if not turns or turns[0].role != "user":
        raise ChatFormatError("the first non-system turn must be from the user")
    for prev, cur in zip(turns, turns[1:], strict=False):
        if prev.role == cur.role:
            raise ChatFormatError(f"two {cur.role} turns in a row; user and assistant must alternate")
    if needs_response and turns[-1].role != "assistant":
        raise ChatFormatError("no response: the conversation must end with an assistant turn")
    if not needs_response and turns[-1].role != "user":
        raise ChatFormatError("a generation prompt must end with a user turn")
    if needs_response and not turns[-1].content.strip():
        raise ChatFormatError("no response: the last assistant turn is empty")


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    *,
    num_image_tokens: int = 0,
    add_generation_prompt: bool = False,
) -> EncodedChat:
    """Encode `messages`; with `add_generation_prompt` the last turn is the user's and the
    result ends with `<|assistant|>` (prompt only, answer_length 0)."""
    validate_roles(messages, needs_response=not add_generation_prompt)
    image_count = sum(m.content.count(IMAGE) for m in messages)
    if image_count > 1:
        raise ChatFormatError(f"{image_count} {IMAGE} placeholders; DiMoE-VL takes at most one image")
    if num_image_tokens and image_count == 0:
        # An image given without a placeholder goes in front of the first user turn, as LLaVA does.
        first_user = next(i for i, m in enumerate(messages) if m.role == "user")
        messages = list(messages)
        messages[first_user] = Message("user", f"{IMAGE}\n{messages[first_user].content}")
    elif image_count and not num_image_tokens:
        raise ChatFormatError(f"the prompt has an {IMAGE} placeholder but no image was given")
    if image_count and next(m for m in messages if IMAGE in m.content).role != "user":
        raise ChatFormatError(f"the {IMAGE} placeholder must be in a user turn")

    last = len(messages) if add_generation_prompt else len(messages) - 1
    prompt = _render(tokenizer, messages[:last], add_generation_prompt=True)
    ids = _encode_text(tokenizer, prompt, num_image_tokens)
    prompt_length = len(ids)
    if not add_generation_prompt:
        full = _render(tokenizer, messages, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ChatFormatError(
                "the tokenizer's chat_template renders the conversation without its generation prompt as a "
                "prefix, so the response cannot be located; use a template where it is"
            )
        ids += tokenizer.encode(full[len(prompt) :].rstrip(), add_special_tokens=False)
        if ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
    return EncodedChat(ids, prompt_length, num_image_tokens if (image_count or num_image_tokens) else 0)


def encode_plain_text(tokenizer: PreTrainedTokenizerBase, text: str) -> EncodedChat:
    """A plain-text record (a pretraining corpus): all of it is response, closed by EOS."""
    return EncodedChat([*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id], 0, 0)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool) -> str:
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    return tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode_text(tokenizer: PreTrainedTokenizerBase, text: str, num_image_tokens: int) -> list[int]:
    """Token ids of rendered text, each `<image>` expanded to `num_image_tokens` image tokens."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    ids: list[int] = []
    for i, piece in enumerate(text.split(IMAGE)):
        if i > 0:
            ids += [image_id] * num_image_tokens
        if piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids
