"""Batched generation engine, prompt/prediction files and the decoding benchmark (docs/design.md §5)."""

from dimoe.infer.benchmark import compare_with_llada, measure, run_benchmark
from dimoe.infer.engine import (
    GenerationEngine,
    GenerationResult,
    PromptBatch,
    StreamChunk,
    generate,
    iter_generate,
    run_generate,
)
from dimoe.infer.inputs import InputError, Request, Result, read_prompts, write_predictions

__all__ = [
    "GenerationEngine",
    "GenerationResult",
    "InputError",
    "PromptBatch",
    "Request",
    "Result",
    "StreamChunk",
    "compare_with_llada",
    "generate",
    "iter_generate",
    "measure",
    "read_prompts",
    "run_benchmark",
    "run_generate",
    "write_predictions",
]
