"""Decoding speed: `threshold` (+ prefix cache + early stop) versus the `llada` sampler, and
batch 1 versus batch 16 throughput, on the tiny model at gen length 64, block 32.

Without --checkpoint a tiny model (configs/model/tiny.yaml) is built with a tokenizer trained on
a synthetic arithmetic corpus, then fitted for --fit-steps steps of masked-diffusion SFT on
"What is a plus b?" → "The answer is c." (responses EOS-padded to the gen length, as LLaDA's SFT
does). The fit is what makes the comparison meaningful: a random model is never confident and
never says EOS, so `threshold` would fall back to LLaDA's schedule (--fit-steps 0 shows that).

    python benchmarks/decode.py [--checkpoint DIR] [--steps 16,64] [--fit-steps 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from rich.console import Console
from rich.table import Table

from dimoe.config.infer import InferConfig
from dimoe.config.loader import load_config
from dimoe.config.model import ModelConfig
from dimoe.data.chat import Message, encode_chat
from dimoe.data.tokenizer import train_tokenizer
from dimoe.diffusion.forward import single_view
from dimoe.diffusion.losses import masked_diffusion_loss
from dimoe.infer.benchmark import measure
from dimoe.infer.engine import GenerationEngine
from dimoe.infer.inputs import Request
from dimoe.model.build import build_model, load_checkpoint

PREAMBLES = ["", "Please help.", "I am doing homework and need to check a sum, please answer it."]


def question(a: int, b: int, preamble: str) -> str:
    return f"{preamble} What is {a} plus {b}?".strip()


def demo_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        a, b = rng.randrange(100), rng.randrange(100)
        pairs.append((question(a, b, rng.choice(PREAMBLES)), f"The answer is {a + b}."))
    return pairs


def build_demo_model(fit_steps: int, gen_length: int, seed: int):
    """The tiny model with a tokenizer of the demo corpus, fitted for `fit_steps` steps."""
    pairs = demo_pairs(2000, seed)
    with TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer([f"{q} {a}" for q, a in pairs], 600, tmp)
    model = build_model(load_config("configs/model/tiny.yaml", ModelConfig), tokenizer, seed=seed)
    fit(model, tokenizer, pairs, fit_steps, gen_length, seed)
    return model.eval(), tokenizer


def sft_batch(tokenizer, pairs: list[tuple[str, str]], gen_length: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts, responses EOS-padded to exactly `gen_length` tokens."""
    rows, prompt_lengths = [], []
    for q, a in pairs:
        chat = encode_chat(tokenizer, [Message("user", q), Message("assistant", a)])
        response = chat.input_ids[chat.prompt_length :][:gen_length]
        rows.append(
            chat.input_ids[: chat.prompt_length]
            + response
            + [tokenizer.eos_token_id] * (gen_length - len(response))
        )
        prompt_lengths.append(chat.prompt_length)
    width = max(prompt_lengths)
    pad = [width - n for n in prompt_lengths]
    ids = torch.tensor([[tokenizer.pad_token_id] * p + row for p, row in zip(pad, rows, strict=True)])
    column = torch.arange(ids.shape[1])
    real = column[None] >= torch.tensor(pad)[:, None]
    return {"input_ids": ids, "attention_mask": real, "prefix_mask": real & (column[None] < width)}


def fit(model, tokenizer, pairs, steps: int, gen_length: int, seed: int, batch_size: int = 16) -> None:
    """Masked-diffusion SFT (LLaDA: loss on masked response tokens, weighted 1/p(t))."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        batch = sft_batch(tokenizer, random.Random(seed + step).sample(pairs, batch_size), gen_length)
        response = batch["attention_mask"] & ~batch["prefix_mask"]
        t = torch.rand(batch_size, generator=generator)
        noised = single_view(batch["input_ids"], response, t, model.config.mask_token_id, generator)
        logits = model(
            noised.noisy_ids, attention_mask=batch["attention_mask"], prefix_mask=batch["prefix_mask"]
        ).logits
        loss = masked_diffusion_loss(logits, batch["input_ids"], noised.masked, noised.p).value
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"fit step {step:4d}  loss {loss.item():.3f}")


def engine_for(args: argparse.Namespace) -> GenerationEngine:
    if args.checkpoint:
        model, tokenizer = load_checkpoint(args.checkpoint)
    else:
        model, tokenizer = build_demo_model(args.fit_steps, args.gen_length, args.seed)
    preset = {"gen_length": args.gen_length, "block_length": args.block_length, "threshold": args.threshold}
    config = InferConfig.model_validate({"presets": {"bench": preset}, "default_preset": "bench"})
    return GenerationEngine(model, tokenizer, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", help="a trained checkpoint directory (default: the fitted tiny demo model)"
    )
    parser.add_argument("--steps", default="16,64", help="comma-separated step budgets to compare")
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--fit-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = engine_for(args)
    requests = [
        Request(str(i), prompt=q) for i, (q, _) in enumerate(demo_pairs(args.requests, args.seed + 1))
    ]

    figures: dict[str, dict] = {}
    for steps in [int(s) for s in args.steps.split(",")]:
        for strategy in ("threshold", "llada"):
            figures[f"{strategy} S={steps} B=16"] = measure(
                engine, requests, batch_size=16, strategy=strategy, steps=steps
            )
    top = max(int(s) for s in args.steps.split(","))
    for strategy in ("threshold", "llada"):
        figures[f"{strategy} S={top} B=1"] = measure(
            engine, requests, batch_size=1, strategy=strategy, steps=top
        )
    report(figures, engine, requests, f"gen {args.gen_length} / block {args.block_length}")
    for strategy in ("threshold", "llada"):
        gain = (
            figures[f"{strategy} S={top} B=16"]["tokens_per_s"]
            / figures[f"{strategy} S={top} B=1"]["tokens_per_s"]
        )
        print(f"{strategy}: batch 16 / batch 1 throughput at S={top}: {gain:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def report(figures: dict[str, dict], engine: GenerationEngine, requests: list[Request], shape: str) -> None:
    """One table; ratios are against `llada` at the same steps and batch size."""
    table = Table(title=f"decoding, {shape}, {len(requests)} requests, {time.strftime('%Y-%m-%d %H:%M')}")
    for column in (
        "run",
        "mean NFE",
        "NFE ratio",
        "tok/s",
        "tok/s ratio",
        "tok/fwd",
        "p50 s",
        "p95 s",
        "NFE×act (B)",
    ):
        table.add_column(column, justify="right")
    for name, f in figures.items():
        baseline = figures[name.replace("threshold", "llada")]
        table.add_row(
            name,
            f"{f['mean_nfe']:.1f}",
            f"{f['mean_nfe'] / baseline['mean_nfe']:.2f}",
            f"{f['tokens_per_s']:.0f}",
            f"{f['tokens_per_s'] / baseline['tokens_per_s']:.2f}",
            f"{f['tokens_per_forward']:.2f}",
            f"{f['latency_p50_s']:.3f}",
            f"{f['latency_p95_s']:.3f}",
            f"{f['nfe_x_active_params_b']:.4f}",
        )
    console = Console(width=150)
    console.print(table)
    for strategy in ("threshold", "llada"):
        sample = engine.generate(requests[:3], strategy=strategy, steps=16)
        for request, result in zip(requests[:3], sample, strict=True):
            console.print(f"{strategy:9s} S=16 {request.prompt!r} → {result.output!r} (NFE {result.nfe})")


if __name__ == "__main__":
    main()
