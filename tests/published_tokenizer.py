"""A tokenizer in the style of LLaDA-MoE-Instruct's (Ling family): `<|endoftext|>` as eos and pad,
`<|mask|>` in the vocabulary but not declared as the mask token, no `<image>`, and its own Jinja
chat template with `<role>` markers and `<|role_end|>` after every turn."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# The rendered format of LLaDA-MoE-Instruct (Ling family): `<role>HUMAN</role>…<|role_end|>`.
LING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set role = message['role'] | lower -%}"
    "{%- if role == 'user' -%}{%- set role = 'HUMAN' -%}{%- endif -%}"
    "{{- '<role>' + (role | upper) + '</role>' + message['content'] + '<|role_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<role>ASSISTANT</role>' -}}{%- endif -%}"
)
SPECIALS = ["<|endoftext|>", "<|mask|>", "<role>", "</role>", "<|role_end|>"]


def ling_style_tokenizer(corpus: list[str], out: Path) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=alphabet, show_progress=False
    )
    core.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        extra_special_tokens=["<role>", "</role>", "<|role_end|>"], chat_template=LING_TEMPLATE,
    )  # fmt: skip
    tokenizer.save_pretrained(out)
    return tokenizer
