"""Tokenizers for DiMoE-VL: the project's own byte-level BPE, or any published HF tokenizer adapted.

`train_tokenizer` trains a BPE with `tokenizers` and saves it in HF format; the saved directory
loads with `transformers.AutoTokenizer.from_pretrained(dir)`, and its chat format is a Jinja
`chat_template` (`CHAT_TEMPLATE`), so `apply_chat_template` renders it for anyone.

`load_tokenizer` loads any HF tokenizer directory and `adapt_tokenizer` adds only what diffusion
VLM training needs and the tokenizer lacks (docs/design.md §3): the `<image>` placeholder, a mask
token (an existing one such as LLaDA's `<|mdm_mask|>` is used when present), a pad token, and, for a
tokenizer without a chat template, the project's role tokens and template. Added tokens get the
next free ids in a fixed order, so adapting the same directory twice (at `data normalize` and at
`model init`) gives the same ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dimoe.errors import UserError

PAD, EOS, MASK, IMAGE = "<|pad|>", "<|eos|>", "<|mask|>", "<image>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
# Order fixes the ids 0..6 of every tokenizer this module trains.
SPECIAL_TOKENS = [PAD, EOS, MASK, IMAGE, SYSTEM, USER, ASSISTANT]
# Mask tokens of published diffusion LMs, used as the mask when a tokenizer has one but does not
# declare it as `mask_token` (LLaDA's tokenizer_config.json does not).
KNOWN_MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>")
# Attribute of an adapted tokenizer listing the tokens the adaptation added (empty once saved).
ADDED_TOKENS_ATTR = "dimoe_added_tokens"
# The project's chat format as Jinja: `<|role|>` + trimmed content per turn, `eos_token` after each
# assistant turn; the generation prompt ends with `<|assistant|>`.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>' + (message['content'] | trim) -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and save it (HF format) to `out_dir`."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise UserError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{len(SPECIAL_TOKENS) + 256} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = wrap_tokenizer(core)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def wrap_tokenizer(core: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        mask_token=MASK,
        additional_special_tokens=[IMAGE, SYSTEM, USER, ASSISTANT],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def iter_corpus_files(paths: Iterable[str | Path]) -> Iterator[str]:
    """Yield the lines of plain-text corpus files (one document per line)."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
        with path.open(encoding="utf-8", errors="replace") as handle:
            yield from (line.rstrip("\n") for line in handle if line.strip())


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load an HF tokenizer directory (the project's or a published one) and adapt it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory not found: {path} (train one with `dimoe tokenizer train`, or give a "
            "published model's directory)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.eos_token is None:
        raise UserError(f"tokenizer at {path} has no eos_token; set one in its tokenizer_config.json")
    adapt_tokenizer(tokenizer)
    return tokenizer


def adapt_tokenizer(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Add what the tokenizer lacks (module doc) in place; returns the tokens added to the vocabulary."""
    vocab = tokenizer.get_vocab()
    new: dict[str, str | list[str]] = {}
    if tokenizer.mask_token is None:
        new["mask_token"] = next((t for t in KNOWN_MASK_TOKENS if t in vocab), MASK)
    if tokenizer.pad_token is None:
        new["pad_token"] = PAD
    extra = [IMAGE] if IMAGE not in vocab else []
    if tokenizer.chat_template is None:
        extra += [role for role in (SYSTEM, USER, ASSISTANT) if role not in vocab]
        tokenizer.chat_template = CHAT_TEMPLATE
    before = len(tokenizer)
    if extra:
        new["extra_special_tokens"] = extra
    tokenizer.add_special_tokens(new, replace_extra_special_tokens=False)
    tokenizer.padding_side = "left"  # prompts of a batch end where the response starts
    added = tokenizer.convert_ids_to_tokens(list(range(before, len(tokenizer))))
    # Kept on the object for `dimoe model init --backbone-from`, which starts these rows at the mean.
    setattr(tokenizer, ADDED_TOKENS_ATTR, added)
    return added


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids the model config needs: pad, eos, mask and image."""
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "mask_token_id": tokenizer.mask_token_id,
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE),
    }
