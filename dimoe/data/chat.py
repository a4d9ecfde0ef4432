"""Chat template: a conversation (+ image) → input ids with the prompt/response boundary.

Layout (special tokens in angle brackets)::

    [<|system|> system text]  <|user|> [<image>×N] user text  <|assistant|> answer <|eos|>  …

Every turn before the last assistant turn is prompt; the last assistant turn plus its `<|eos|>`
is the response (what the diffusion loss supervises and what decoding generates). The `<image>`
placeholder expands to `num_image_tokens` copies of the image token, so the model can write the
projected vision features at exactly those positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from dimoe.data.tokenizer import ASSISTANT, IMAGE, ROLE_TOKENS
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
    ids: list[int] = []
    for message in messages[:last]:
        ids += _encode_turn(tokenizer, message, num_image_tokens)
    ids.append(tokenizer.convert_tokens_to_ids(ASSISTANT))
    prompt_length = len(ids)
    if not add_generation_prompt:
        ids += _encode_text(tokenizer, messages[-1].content.strip(), 0)
        ids.append(tokenizer.eos_token_id)
    return EncodedChat(ids, prompt_length, num_image_tokens if (image_count or num_image_tokens) else 0)


def _encode_turn(tokenizer: PreTrainedTokenizerBase, message: Message, num_image_tokens: int) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(ROLE_TOKENS[message.role])]
    ids += _encode_text(tokenizer, message.content.strip(), num_image_tokens)
    if message.role == "assistant":
        ids.append(tokenizer.eos_token_id)
    return ids


def _encode_text(tokenizer: PreTrainedTokenizerBase, text: str, num_image_tokens: int) -> list[int]:
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    ids: list[int] = []
    for i, piece in enumerate(text.split(IMAGE)):
        if i > 0:
            ids += [image_id] * num_image_tokens
        piece = piece.strip()
        if piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids
