"""The long-answer task of benchmarks/decode.py, and a tiny model fitted to it in-process.

"Describe every shape": the prompt lists n shapes of a scene, the answer describes each in turn.

    Describe every shape. shape 1: red circle at top left; shape 2: blue star at bottom centre; …
    → There is a red circle at top left. There is a blue star at bottom centre. …

Both lists take nine tokens an item, so every answer token sits a fixed distance after the
prompt token it restates, a relation the tiny model (configs/model/tiny.yaml) learns within a few
hundred steps: with n = 6 it describes held-out scenes exactly after 300 steps of LLaDA's SFT
objective. A free-length rewrite ("red circle, blue star" → "There is a red circle. …") was not
learned in 600 steps: the model wrote the right number of sentences with the wrong shapes.
Scenes are random, so held-out scenes are new combinations; a constant answer scores nothing.
"""

from __future__ import annotations

import random
from tempfile import TemporaryDirectory

import torch
from transformers import PreTrainedTokenizerBase

from dimoe.config.loader import load_config
from dimoe.config.model import ModelConfig
from dimoe.data.chat import Message, encode_chat
from dimoe.data.tokenizer import train_tokenizer
from dimoe.diffusion.forward import single_view
from dimoe.diffusion.losses import masked_diffusion_loss
from dimoe.eval.metrics import exact_match, token_f1
from dimoe.infer.engine import GenerationEngine
from dimoe.infer.inputs import Request, Result
from dimoe.model.build import build_model
from dimoe.model.modeling import DiMoEVLModel
from dimoe.train.objective import block_layout

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "heart", "diamond"]
ROWS = ["top", "middle", "bottom"]
COLUMNS = ["left", "centre", "right"]
TOKENS_PER_ITEM = 9


def scene(rng: random.Random, shapes: int) -> tuple[str, str]:
    """One (question, answer) pair describing `shapes` random shapes."""
    items = [
        (rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(ROWS), rng.choice(COLUMNS))
        for _ in range(shapes)
    ]
    listed = " ".join(f"shape {i + 1}: {c} {s} at {r} {col};" for i, (c, s, r, col) in enumerate(items))
    answer = " ".join(f"There is a {c} {s} at {r} {col}." for c, s, r, col in items)
    return f"Describe every shape. {listed}", answer


def scenes(count: int, shapes: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [scene(rng, shapes) for _ in range(count)]


def shapes_for(gen_length: int) -> int:
    """Shapes per scene whose answer fills about 85% of `gen_length` (the rest is EOS)."""
    return max(1, int(0.85 * gen_length) // TOKENS_PER_ITEM)


def score(results: list[Result], references: list[str]) -> dict[str, float]:
    """Exact match and token F1 in points (0-100)."""
    pairs = list(zip(results, references, strict=True))
    return {
        "exact_match": 100 * sum(exact_match(r.output, ref) for r, ref in pairs) / len(pairs),
        "token_f1": 100 * sum(token_f1(r.output, ref) for r, ref in pairs) / len(pairs),
    }


def sft_batch(
    tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], gen_length: int
) -> dict[str, torch.Tensor]:
    """Left-padded prompts, responses EOS-padded to exactly `gen_length` tokens (LLaDA's SFT)."""
    rows, prompt_lengths = [], []
    for question, answer in pairs:
        chat = encode_chat(tokenizer, [Message("user", question), Message("assistant", answer)])
        response = chat.input_ids[chat.prompt_length :][:gen_length]
        padding = [tokenizer.eos_token_id] * (gen_length - len(response))
        rows.append(chat.input_ids[: chat.prompt_length] + response + padding)
        prompt_lengths.append(chat.prompt_length)
    width = max(prompt_lengths)
    pad = [width - n for n in prompt_lengths]
    ids = torch.tensor([[tokenizer.pad_token_id] * p + row for p, row in zip(pad, rows, strict=True)])
    column = torch.arange(ids.shape[1])
    real = column[None] >= torch.tensor(pad)[:, None]
    return {"input_ids": ids, "attention_mask": real, "prefix_mask": real & (column[None] < width)}


def denoising_logits(model: DiMoEVLModel, batch: dict, noisy_ids: torch.Tensor) -> torch.Tensor:
    """The logits of `noisy_ids` under the model's own mask; for a `block` model, block diffusion's
    one-forward layout, where each noisy block sees the prompt, itself and the clean earlier blocks
    (what the exact block cache gives it when decoding)."""
    if model.config.attention != "block":
        return model(
            noisy_ids, attention_mask=batch["attention_mask"], prefix_mask=batch["prefix_mask"]
        ).logits
    response = int((batch["attention_mask"] & ~batch["prefix_mask"]).sum(dim=1).max())
    ids, real, positions, mask = block_layout(
        noisy_ids, batch["input_ids"][:, -response:], batch["attention_mask"], batch["prefix_mask"],
        model.config.block_size,
    )  # fmt: skip
    noisy = slice(0, noisy_ids.shape[1])
    return model(ids, real.long(), position_ids=positions, layout_mask=mask, logits_positions=noisy).logits


def sft_step(
    model: DiMoEVLModel, optimizer: torch.optim.Optimizer, batch: dict, generator: torch.Generator
) -> float:
    """One step of masked-diffusion SFT: t ~ U(0, 1), mask response tokens with p(t), cross-entropy
    on the masked ones weighted 1/p(t) (LLaDA, Nie et al. 2025, Eq. 5; per block given the clean
    earlier ones for a `block` model). Returns the loss."""
    response = batch["attention_mask"] & ~batch["prefix_mask"]
    t = torch.rand(len(response), generator=generator)
    noised = single_view(batch["input_ids"], response, t, model.config.mask_token_id, generator)
    logits = denoising_logits(model, batch, noised.noisy_ids)
    loss = masked_diffusion_loss(logits, batch["input_ids"], noised.masked, noised.p).value
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def check_single_tokens(tokenizer: PreTrainedTokenizerBase, shapes: int) -> None:
    """Every word of the task must be one token, so that every item takes TOKENS_PER_ITEM tokens on
    both sides and the copy distance is the same for all of them."""
    words = [f" {w}" for w in [*COLOURS, *SHAPES, *ROWS, *COLUMNS, "shape", "at", "There", "is", "a"]]
    words += [f" {i}" for i in range(1, shapes + 1)] + [":", ";", "."]
    split = [w for w in words if len(tokenizer(w).input_ids) != 1]
    if split:
        raise ValueError(f"the task tokenizer splits {split}: give it a larger vocabulary")


def fitted_model(
    gen_length: int,
    validation: list[tuple[str, str]],
    max_steps: int,
    seed: int,
    start: tuple[DiMoEVLModel, PreTrainedTokenizerBase] | None = None,
    block_size: int | None = None,
    check_every: int = 100,
) -> tuple[DiMoEVLModel, PreTrainedTokenizerBase, int]:
    """The tiny model with a tokenizer of the task, fitted (seeded, batch 16, AdamW 1e-3) until it
    describes every `validation` scene exactly or `max_steps` pass. Returns it and the steps.
    `start`: a fitted model and its tokenizer to continue from (default: random init). With
    `block_size`, the model has `attention: block` and is fitted by block diffusion."""
    train = scenes(4000, shapes_for(gen_length), seed)
    if start is None:
        with TemporaryDirectory() as folder:
            tokenizer = train_tokenizer([f"{q} {a}" for q, a in train], 400, folder)
    else:
        tokenizer = start[1]
    check_single_tokens(tokenizer, shapes_for(gen_length))
    spec = load_config("configs/model/tiny.yaml", ModelConfig)
    if block_size is not None:
        spec = spec.model_copy(update={"attention": "block", "block_size": block_size})
    model = build_model(spec, tokenizer, seed=seed)
    if start is not None:  # the mask is not a weight: the same weights load under any attention
        model.load_state_dict(start[0].state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    requests = [Request(str(i), prompt=q) for i, (q, _) in enumerate(validation)]
    for step in range(1, max_steps + 1):
        model.train()
        batch = sft_batch(tokenizer, random.Random(seed + step).sample(train, 16), gen_length)
        loss = sft_step(model, optimizer, batch, generator)
        if step % check_every and step != max_steps:
            continue
        engine = GenerationEngine(model.eval(), tokenizer)
        results = engine.generate(requests, gen_length=gen_length, batch_size=len(requests))
        match = score(results, [a for _, a in validation])["exact_match"]
        print(
            f"gen {gen_length}, {spec.attention} attention: fit step {step} loss {loss:.3f} "
            f"validation exact match {match:.0f}",
            flush=True,
        )
        if match == 100:
            break
    return model.eval(), tokenizer, step
