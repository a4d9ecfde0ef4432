"""`dimoe quickstart`: the whole platform end to end on one machine (tiny profile, local Ray).

Each step writes its artifacts under `artifacts/` and a marker `artifacts/quickstart/<step>.done`
(with its result as JSON); a re-run skips finished steps, so an interrupted quickstart continues
where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console()


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    run: Callable[[QuickstartContext], dict[str, Any]]


@dataclass(frozen=True)
class QuickstartContext:
    root: Path
    fast: bool
    seed: int = 0

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def init_checkpoint(self) -> Path:
        return self.root / "models" / "tiny-init"


def _train_tokenizer(ctx: QuickstartContext) -> dict[str, Any]:
    from dimoe.data.tokenizer import train_tokenizer

    texts = [f"There are {n} {c} shapes on the {p}." for n in range(1, 4) for c in "red green blue".split()
             for p in "left right top bottom".split()]
    tok = train_tokenizer(texts * 4, 512, ctx.tokenizer_dir)
    return {"tokenizer": str(ctx.tokenizer_dir), "vocab": len(tok)}


def _init_model(ctx: QuickstartContext) -> dict[str, Any]:
    from dimoe.config.loader import load_config
    from dimoe.config.model import ModelConfig
    from dimoe.data.tokenizer import load_tokenizer
    from dimoe.model.build import build_model, load_checkpoint, save_checkpoint
    from dimoe.model.params import count_parameters

    tok = load_tokenizer(ctx.tokenizer_dir)
    model = build_model(load_config("configs/model/tiny.yaml", ModelConfig), tok, seed=ctx.seed)
    save_checkpoint(model, tok, ctx.init_checkpoint)
    reloaded, _ = load_checkpoint(ctx.init_checkpoint)
    return {"checkpoint": str(ctx.init_checkpoint), **count_parameters(reloaded).as_dict()}


STEPS = [
    Step("tokenizer", "train the demo tokenizer", _train_tokenizer),
    Step("model_init", "build, save and reload the tiny model", _init_model),
]


def run_quickstart(root: str | Path = "artifacts", *, fast: bool = False, restart: bool = False) -> dict[str, Any]:
    ctx = QuickstartContext(Path(root), fast)
    markers = ctx.root / "quickstart"
    markers.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for i, step in enumerate(STEPS, 1):
        marker = markers / f"{step.name}.done"
        if marker.exists() and not restart:
            results[step.name] = json.loads(marker.read_text())
            console.print(f"[dim][{i}/{len(STEPS)}] {step.title}: done earlier, skipped[/]")
            continue
        console.rule(f"[{i}/{len(STEPS)}] {step.title}")
        start = time.perf_counter()
        result = step.run(ctx)
        result["seconds"] = round(time.perf_counter() - start, 1)
        marker.write_text(json.dumps(result, indent=2))
        results[step.name] = result
        console.print_json(json.dumps(result))
    return results
