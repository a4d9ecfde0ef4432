"""lmms-eval hooks of the `dimoe_demo_vqa` task: the demo rows' image, question and score, as
`dimoe eval run` reads and scores them (dimoe.eval.tasks.DemoTask)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from dimoe.eval import metrics

DATA_ENV = "DIMOE_DEMO_DATA"


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The row's image; the generator writes its path relative to the data folder (DATA)."""
    root = Path(os.environ.get(DATA_ENV, "artifacts/data/demo"))
    with Image.open(root / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    # The demo model is trained on the bare questions: no answer-format instruction.
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"exact_match": metrics.exact_match(results[0] or "", doc["answer"])}
