"""Rows of the demo VQA test file, as `dimoe data synth` writes them, and a small eval config over
them, for the eval tests."""

import json
from pathlib import Path

from PIL import Image

from dimoe.config.eval import EvalConfig
from dimoe.config.infer import InferConfig

# Presets short enough for a random checkpoint: one 8-token block.
TINY_PRESETS = InferConfig.model_validate(
    {
        "presets": {
            "fast": {"steps": 2, "gen_length": 8, "block_length": 8},
            "best": {"steps": 4, "gen_length": 8, "block_length": 8},
        },
        "default_preset": "fast",
    }
)


def vqa_row(row_id: str, image: str, question: str, answer: str, question_type: str) -> dict[str, str]:
    return {
        "id": row_id,
        "image": image,
        "question": question,
        "answer": answer,
        "question_type": question_type,
    }


def mini_eval_config(root: Path) -> EvalConfig:
    """Suite `mini`: two demo tasks on four rows with images under `root`/DATA, and `gqa`, whose
    data is missing."""
    data = root / "DATA"
    (data / "images").mkdir(parents=True)
    for index, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (32, 32), colour).save(data / f"images/{index}.png")
    rows = [
        vqa_row("c0", "images/0.png", "What colour is the shape?", "red", "colour"),
        vqa_row("c1", "images/1.png", "What colour is the shape?", "blue", "colour"),
        vqa_row("c2", "images/0.png", "What colour is it?", "red", "colour"),
        vqa_row("s0", "images/1.png", "What shape is it?", "square", "shape"),
    ]
    (data / "eval").mkdir()
    (data / "eval/vqa_test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return EvalConfig.model_validate(
        {
            "data_root": str(data),
            "suites": {"mini": ["demo_vqa_colour", "demo_vqa_shape", "gqa"]},
            "tasks": {
                "demo_vqa_colour": {"path": "eval/vqa_test.jsonl"},
                "demo_vqa_shape": {"path": "eval/vqa_test.jsonl"},
                "gqa": {"path": "benchmarks/gqa/testdev.json"},
            },
        }
    )
