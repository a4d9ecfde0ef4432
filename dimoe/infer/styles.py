"""`dimoe infer compare-styles`: LLaDA-1.0-style and LLaDA-2.0-style decoding of the same
checkpoint and prompts, side by side (the comparison script of the MiniMind → LLaDA2.0 report).

- LLaDA 1.0: the published sampler (`llada`, low-confidence remasking) at one token per step
  (steps = gen_length), the setting LLaDA reports and Fast-dLLM and dInfer measure against;
- LLaDA 2.0: block-wise parallel decoding, `threshold` (confident tokens revealed together), on
  the exact block cache of a `block`-attention model (the approximate block
  cache of any other).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dimoe.infer.inputs import Request


def style_settings(gen_length: int, block_length: int, threshold: float) -> dict[str, dict[str, Any]]:
    """The decoding fields of each style."""
    common = {"gen_length": gen_length, "block_length": block_length, "temperature": 0.0}
    return {
        "llada-1.0": {**common, "strategy": "llada", "steps": gen_length, "cache": "prefix"},
        "llada-2.0": {
            **common,
            "strategy": "threshold",
            "steps": gen_length,
            "threshold": threshold,
            "cache": "block",
        },
    }


def compare_styles(
    checkpoint: str | Path,
    prompts: list[str],
    *,
    gen_length: int = 64,
    block_length: int = 32,
    threshold: float = 0.9,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Decode `prompts` in both styles; per style the outputs, mean NFE, tokens/s (generated tokens
    before EOS over wall time) and tokens per forward."""
    from dimoe.infer.engine import GenerationEngine

    engine = GenerationEngine.from_checkpoint(checkpoint)
    requests = [Request(id=str(i), prompt=prompt) for i, prompt in enumerate(prompts)]
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "attention": engine.model.config.attention}
    for style, fields in style_settings(gen_length, block_length, threshold).items():
        start = time.perf_counter()
        results = engine.generate(requests, batch_size=batch_size, **fields)
        seconds = time.perf_counter() - start
        tokens = sum(len(r.output_ids) for r in results)
        forwards = sum(r.nfe for r in results)
        report[style] = {
            "settings": fields,
            "outputs": [r.output for r in results],
            "mean_nfe": forwards / len(results),
            "tokens_per_s": tokens / seconds,
            "tokens_per_forward": tokens / max(forwards, 1),
            "seconds": seconds,
        }
    return report
