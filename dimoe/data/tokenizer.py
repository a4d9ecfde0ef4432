"""Byte-level BPE tokenizer for DiMoE-VL, trained with `tokenizers`, saved in HF format.

The saved directory loads with `transformers.AutoTokenizer.from_pretrained(dir)`; the diffusion
mask token is exposed as `tokenizer.mask_token`, the image placeholder and chat roles as
additional special tokens (see `SPECIAL_TOKENS`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dimoe.errors import UserError

PAD, EOS, MASK, IMAGE = "<|pad|>", "<|eos|>", "<|mask|>", "<image>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
# Order fixes the ids 0..6 of every tokenizer this module trains.
SPECIAL_TOKENS = [PAD, EOS, MASK, IMAGE, SYSTEM, USER, ASSISTANT]


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
    """Load an HF tokenizer directory and check it has what diffusion decoding needs."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory not found: {path} (train one with `dimoe tokenizer train`)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    missing = [name for name in ("mask_token", "eos_token") if getattr(tokenizer, name) is None]
    if IMAGE not in tokenizer.get_vocab():
        missing.append(f"the image token {IMAGE!r}")
    if missing:
        raise UserError(f"tokenizer at {path} lacks {', '.join(missing)}; add them as special tokens")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids the model config needs: pad, eos, mask and image."""
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "mask_token_id": tokenizer.mask_token_id,
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE),
    }
