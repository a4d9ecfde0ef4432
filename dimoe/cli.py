"""`dimoe …` — the command line. Thin: parse arguments, load config, call one library function.

User mistakes (bad path, bad config key, malformed record) end in one red line naming the problem,
not a traceback; `DIMOE_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

console = Console(stderr=True)
app = typer.Typer(help="DiMoE-VL: masked-diffusion vision-language MoE on Ray.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Train or inspect tokenizers.", no_args_is_help=True)
model_app = typer.Typer(help="Build and inspect model checkpoints.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(model_app, name="model")
train_app = typer.Typer(help="Train curriculum stages on Ray Train + DeepSpeed.", no_args_is_help=True)
app.add_typer(train_app, name="train")
infer_app = typer.Typer(help="Batched diffusion decoding and its benchmark.", no_args_is_help=True)
app.add_typer(infer_app, name="infer")

F = TypeVar("F", bound=Callable[..., Any])
SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: a.b.c=value (repeatable).")
]


def user_errors(fn: F) -> F:
    """Turn the errors a user can fix into one clear line and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError) as exc:
            if os.environ.get("DIMOE_DEBUG"):
                raise
            message = (exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)).strip()
            console.print(
                "error: " + (message or type(exc).__name__), style="bold red", highlight=False, markup=False
            )
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


# -- config ----------------------------------------------------------------------------------------
@config_app.command("show")
@user_errors
def config_show(
    file: Path,
    set_: SetOption = None,
    kind: Annotated[
        str | None, typer.Option(help="Schema to validate with (default: from the folder).")
    ] = None,
) -> None:
    """Print the resolved config (inheritance and overrides applied, defaults filled in)."""
    from dimoe.config.loader import dump_config, load_config
    from dimoe.config.registry import schema_for

    typer.echo(dump_config(load_config(file, schema_for(file, kind), set_ or [])))


# -- tokenizer ---------------------------------------------------------------------------------------
@tokenizer_app.command("train")
@user_errors
def tokenizer_train(
    corpus: Annotated[list[Path], typer.Option(help="Plain-text corpus file(s), one document per line.")],
    out: Annotated[Path, typer.Option(help="Output directory (HF tokenizer).")],
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size.")] = 2048,
) -> None:
    """Train a byte-level BPE tokenizer with DiMoE-VL's special tokens."""
    from dimoe.data.tokenizer import iter_corpus_files, train_tokenizer

    tok = train_tokenizer(iter_corpus_files(corpus), vocab_size, out)
    console.print(f"tokenizer with {len(tok)} tokens written to {out} (mask token {tok.mask_token!r})")


# -- model -------------------------------------------------------------------------------------------
@model_app.command("init")
@user_errors
def model_init(
    config: Annotated[Path, typer.Option(help="Model config YAML, e.g. configs/model/tiny.yaml.")],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer directory.")],
    out: Annotated[Path, typer.Option(help="Output checkpoint directory.")],
    set_: SetOption = None,
    backbone_from: Annotated[Path | None, typer.Option(help="Local LLaDA-MoE directory.")] = None,
    vision_from: Annotated[Path | None, typer.Option(help="Local SigLIP directory.")] = None,
    seed: int = 0,
) -> None:
    """Create a DiMoE-VL checkpoint: random init, or assembled from pretrained parts."""
    from dimoe.config.loader import load_config
    from dimoe.config.model import ModelConfig
    from dimoe.data.tokenizer import load_tokenizer
    from dimoe.model.build import build_model, save_checkpoint
    from dimoe.model.params import count_parameters

    spec = load_config(config, ModelConfig, set_ or [])
    tok = load_tokenizer(tokenizer)
    model = build_model(spec, tok, backbone_from=backbone_from, vision_from=vision_from, seed=seed)
    save_checkpoint(model, tok, out)
    print_json({"checkpoint": str(out), **count_parameters(model).as_dict()})


@model_app.command("info")
@user_errors
def model_info(checkpoint: Path) -> None:
    """Print total / active parameters and the config of a checkpoint."""
    from dimoe.model.build import load_checkpoint
    from dimoe.model.params import count_parameters

    model, _ = load_checkpoint(checkpoint)
    print_json({"parameters": count_parameters(model).as_dict(), "config": model.config.to_dict()})


# -- train -------------------------------------------------------------------------------------------
@train_app.command("run")
@user_errors
def train_run(
    config: Annotated[Path, typer.Option(help="Stage config, e.g. configs/train/tiny/stage2_full.yaml.")],
    set_: SetOption = None,
) -> None:
    """Train one stage (re-running the same command resumes from its latest checkpoint)."""
    from dimoe.config.loader import load_config
    from dimoe.config.train import TrainConfig
    from dimoe.train.launcher import run_stage

    result = run_stage(load_config(config, TrainConfig, set_ or []))
    print_json({"stage": result.stage, "final": str(result.final_dir), "logs": str(result.log_dir)})


@train_app.command("all")
@user_errors
def train_all(
    config_dir: Annotated[Path, typer.Option(help="Folder with stage0_naive … stage3_lownfe YAML.")] = Path(
        "configs/train/tiny"
    ),
    set_: SetOption = None,
    stages: Annotated[str | None, typer.Option(help="Comma-separated subset of stages to run.")] = None,
) -> None:
    """Chain stage0 → stage1 → stage2 → stage3, each from the previous final checkpoint."""
    from dimoe.train.launcher import load_curriculum, run_curriculum

    results = run_curriculum(
        load_curriculum(config_dir, set_ or []), stages=stages.split(",") if stages else None
    )
    print_json([{"stage": r.stage, "final": str(r.final_dir)} for r in results])


# -- infer -------------------------------------------------------------------------------------------
Preset = Annotated[str | None, typer.Option(help="fast | mid | best (8 / 16 / 32 steps).")]
Strategy = Annotated[str | None, typer.Option(help="threshold (default) | llada.")]
InferConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="Infer config (default configs/infer/default.yaml).")
]


@infer_app.command("generate")
@user_errors
def infer_generate(
    checkpoint: Annotated[Path, typer.Option(help="HF-format checkpoint directory.")],
    input: Annotated[
        Path, typer.Option(help="prompts.json / prompts.jsonl: {id, prompt, image?} or {id, messages}.")
    ],
    out: Annotated[Path, typer.Option(help="Output preds.jsonl.")],
    preset: Preset = "mid",
    strategy: Strategy = None,
    steps: int | None = None,
    gen_length: int | None = None,
    block_length: int | None = None,
    temperature: float | None = None,
    threshold: float | None = None,
    batch_size: int | None = None,
    config: InferConfigOpt = None,
    set_: SetOption = None,
) -> None:
    """Generate answers for a prompt file with the batched diffusion decoder."""
    from dimoe.infer.engine import run_generate

    overrides = {"strategy": strategy, "steps": steps, "gen_length": gen_length, "block_length": block_length,
                 "temperature": temperature, "threshold": threshold, "batch_size": batch_size}  # fmt: skip
    summary = run_generate(
        checkpoint, input, out, preset, overrides, progress=True, config_path=config, set_overrides=set_ or []
    )
    print_json(summary)


@infer_app.command("benchmark")
@user_errors
def infer_benchmark(
    checkpoint: Annotated[Path, typer.Option(help="HF-format checkpoint directory.")],
    dataset_jsonl: Annotated[Path, typer.Option(help="Prompt file (same rows as `infer generate`).")],
    out: Annotated[Path, typer.Option(help="Where to write bench.json.")] = Path("bench.json"),
    preset: Preset = "mid",
    strategy: Strategy = None,
    batch_size: int | None = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N prompts.")] = None,
    config: InferConfigOpt = None,
    set_: SetOption = None,
) -> None:
    """Latency p50/p95, tokens/s, NFE and NFE × active params — the strategy beside `llada`."""
    from dimoe.infer.benchmark import run_benchmark

    print_json(
        run_benchmark(
            checkpoint, dataset_jsonl, preset, strategy, out=out, batch_size=batch_size, limit=limit,
            config_path=config, set_overrides=set_ or [],
        )
    )  # fmt: skip


@app.command("quickstart")
@user_errors
def quickstart(
    fast: Annotated[bool, typer.Option(help="Shorter budgets (CI).")] = False,
    root: Annotated[Path, typer.Option(help="Where artifacts go.")] = Path("artifacts"),
    restart: Annotated[bool, typer.Option(help="Redo finished steps instead of skipping them.")] = False,
) -> None:
    """Run the whole platform end to end on this machine (tiny model, built-in data, local Ray)."""
    from dimoe.quickstart import run_quickstart

    run_quickstart(root, fast=fast, restart=restart)


def main() -> None:
    app(prog_name="dimoe")


if __name__ == "__main__":
    main()
