"""`dimoe …` — the command line. Thin: parse arguments, load config, call one library function.

User mistakes (`dimoe.errors.UserError`: bad config key, malformed record, unusable option; or a
missing path) end in one red line naming the problem, not a traceback; `DIMOE_DEBUG=1` shows the
traceback. The `ray_jobs/*.py` scripts run these same commands through `run_command`, so a Ray job
accepts exactly the flags and prints exactly the help of `dimoe …`.
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

from dimoe import __version__
from dimoe.errors import UserError

console = Console(stderr=True)
app = typer.Typer(help="DiMoE-VL: masked-diffusion vision-language MoE on Ray.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Train or inspect tokenizers.", no_args_is_help=True)
model_app = typer.Typer(help="Build and inspect model checkpoints.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(model_app, name="model")
data_app = typer.Typer(
    help="Demo data, normalization and stage blends (Ray Data → Parquet).", no_args_is_help=True
)
app.add_typer(data_app, name="data")
train_app = typer.Typer(help="Train curriculum stages on Ray Train + DeepSpeed.", no_args_is_help=True)
app.add_typer(train_app, name="train")
eval_app = typer.Typer(help="Evaluate checkpoints, score predictions, summarize.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
diag_app = typer.Typer(help="Diagnostics of problems A–F (JSON + PNG plots).", no_args_is_help=True)
app.add_typer(diag_app, name="diag")
tools_app = typer.Typer(help="Paper tables and other tools.", no_args_is_help=True)
app.add_typer(tools_app, name="tools")
infer_app = typer.Typer(help="Batched diffusion decoding and its benchmark.", no_args_is_help=True)
app.add_typer(infer_app, name="infer")
tune_app = typer.Typer(help="Ablation grids on Ray Tune.", no_args_is_help=True)
app.add_typer(tune_app, name="tune")

F = TypeVar("F", bound=Callable[..., Any])
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Override a config key, e.g. lr=1e-4 (repeatable)."),
]
AddressOption = Annotated[
    str | None,
    typer.Option(help="Ray cluster address (default: RAY_ADDRESS when set, else a local cluster)."),
]


def user_errors(fn: F) -> F:
    """Turn the errors a user can fix into one clear line and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UserError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
            if os.environ.get("DIMOE_DEBUG"):
                raise
            message = str(exc).strip() or type(exc).__name__
            # soft_wrap: one line however narrow the terminal, so logs and tests see the whole message
            console.print(
                "error: " + message, style="bold red", highlight=False, markup=False, soft_wrap=True
            )
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dimoe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """DiMoE-VL: masked-diffusion vision-language MoE on Ray."""


def command(*path: str) -> Any:
    """The click command behind `dimoe <path…>` (e.g. `command("train", "run")`)."""
    import typer.main

    node = typer.main.get_command(app)
    for name in path:
        node = node.commands[name]  # type: ignore[attr-defined]
    return node


def run_command(*path: str) -> None:
    """Run `dimoe <path…>` as a program of its own, arguments from sys.argv (the `ray_jobs/` scripts)."""
    command(*path).main(prog_name="dimoe " + " ".join(path))


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


@model_app.command("convert-ar")
@user_errors
def model_convert_ar(
    from_: Annotated[Path, typer.Option("--from", help="Local HF causal LM (Llama, Mistral, Qwen2, Qwen3).")],
    out: Annotated[Path, typer.Option(help="Output checkpoint directory.")],
    config: Annotated[Path, typer.Option(help="Model config YAML for the fields a causal LM lacks.")] = Path(
        "configs/model/tiny.yaml"
    ),
    set_: SetOption = None,
    attention: Annotated[
        str, typer.Option(help="full, prefix, or causal (reproduces the AR logits).")
    ] = "full",
    experts: Annotated[int, typer.Option(help="Upcycle each MLP into this many experts (0: dense).")] = 0,
    top_k: Annotated[int, typer.Option(help="Active experts per token when upcycled.")] = 2,
    router_noise: Annotated[float, typer.Option(help="Std of the upcycled routers' random weights.")] = 0.02,
    vision_from: Annotated[
        Path | None, typer.Option(help="Local SigLIP directory (default: text-only).")
    ] = None,
    seed: int = 0,
) -> None:
    """Convert a causal LM into a DiMoE backbone, dense or upcycled to MoE (AR → diffusion)."""
    from dimoe.config.loader import load_config
    from dimoe.config.model import ModelConfig
    from dimoe.model.causal_lm import convert_causal_lm

    base = load_config(config, ModelConfig, [*(set_ or []), f"attention={attention}"])
    print_json(
        convert_causal_lm(from_, out, base, experts=experts, top_k=top_k, router_noise=router_noise,
                          vision_from=vision_from, seed=seed)
    )  # fmt: skip


@model_app.command("pretrain-vision")
@user_errors
def model_pretrain_vision(
    config: Annotated[Path, typer.Option(help="e.g. configs/vision_pretrain/tiny.yaml.")] = Path(
        "configs/vision_pretrain/tiny.yaml"
    ),
    set_: SetOption = None,
) -> None:
    """Pretrain a small SigLIP from scratch (sigmoid image–caption loss) for `model init --vision-from`."""
    from dimoe.config.loader import load_config
    from dimoe.config.train import VisionPretrainConfig
    from dimoe.train.vision_pretrain import pretrain_vision

    print_json(pretrain_vision(load_config(config, VisionPretrainConfig, set_ or [])))


@model_app.command("info")
@user_errors
def model_info(checkpoint: Path) -> None:
    """Print total / active parameters and the config of a checkpoint."""
    from dimoe.model.build import load_checkpoint
    from dimoe.model.params import count_parameters

    model, _ = load_checkpoint(checkpoint)
    print_json({"parameters": count_parameters(model).as_dict(), "config": model.config.to_dict()})


# -- data --------------------------------------------------------------------------------------------
def _connect_ray(address: str | None) -> None:
    from dimoe.io import ensure_ray

    ensure_ray(address)


@data_app.command("synth")
@user_errors
def data_synth(
    out: Annotated[Path, typer.Option(help="Output folder (raw/, eval/, tokenizer/).")] = Path(
        "artifacts/data/demo"
    ),
    seed: int = 0,
    size: Annotated[int, typer.Option(help="Number of scenes.")] = 3000,
    extra_test_scenes: Annotated[
        int, typer.Option(help="More test scenes beyond 5% of --size; the training data stays the same.")
    ] = 0,
) -> None:
    """Generate the built-in vision-language demo data and train its tokenizer."""
    from dimoe.data.synthetic import synthesize

    print_json(synthesize(out, seed=seed, size=size, extra_test_scenes=extra_test_scenes))


@data_app.command("normalize")
@user_errors
def data_normalize(
    in_: Annotated[Path, typer.Option("--in", help="Folder of raw JSON/JSONL files.")],
    out: Annotated[Path, typer.Option(help="Output folder for normalized Parquet.")],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer directory.")],
    datasets_root: Annotated[Path | None, typer.Option(help="Root that image paths resolve under.")] = None,
    config: Annotated[Path | None, typer.Option(help="configs/data/normalize.yaml-style config.")] = None,
    set_: SetOption = None,
    address: AddressOption = None,
) -> None:
    """Parse, validate, tokenize and write Parquet per source stage; rejects kept with reasons."""
    from dimoe.config.data import NormalizeConfig
    from dimoe.config.loader import load_config
    from dimoe.data.normalize import normalize

    cfg = load_config(config, NormalizeConfig, set_ or [])
    _connect_ray(address)
    summary = normalize(in_, out, tokenizer, datasets_root, cfg)
    print_json(summary["totals"])


@data_app.command("build-stage-blends")
@user_errors
def data_build_blends(
    config: Annotated[Path, typer.Option(help="Blend config.")] = Path("configs/data/stage_blends.yaml"),
    set_: SetOption = None,
    address: AddressOption = None,
) -> None:
    """Weighted, seeded mixtures of the source stages for each curriculum stage."""
    from dimoe.config.data import BlendConfig
    from dimoe.config.loader import load_config
    from dimoe.data.blend import build_stage_blends

    cfg = load_config(config, BlendConfig, set_ or [])
    _connect_ray(address)
    print_json(build_stage_blends(cfg))


@data_app.command("build-wds")
@user_errors
def data_build_wds(
    config: Annotated[Path, typer.Option(help="WebDataset config.")] = Path("configs/data/webdataset.yaml"),
    set_: SetOption = None,
) -> None:
    """Write a blend as WebDataset tar shards (read by `data.format: webdataset` training and by
    `ray.data.read_webdataset`)."""
    from dimoe.config.data import WebDatasetConfig
    from dimoe.config.loader import load_config
    from dimoe.data.wds import build_webdataset

    print_json(build_webdataset(load_config(config, WebDatasetConfig, set_ or [])))


# -- train -------------------------------------------------------------------------------------------
@train_app.command("run")
@user_errors
def train_run(
    config: Annotated[Path, typer.Option(help="Stage config, e.g. configs/train/tiny/stage2_full.yaml.")],
    set_: SetOption = None,
    stage: Annotated[
        str | None, typer.Option(help="Expected stage name: refuse a config of another stage.")
    ] = None,
    address: AddressOption = None,
) -> None:
    """Train one stage (re-running the same command resumes from its latest checkpoint)."""
    from dimoe.config.loader import load_config
    from dimoe.config.train import TrainConfig
    from dimoe.train.launcher import run_stage

    cfg = load_config(config, TrainConfig, set_ or [])
    if stage is not None and cfg.stage != stage:
        raise UserError(f"--stage {stage} does not match the stage of {config}: {cfg.stage!r}")
    result = run_stage(cfg, address=address)
    print_json({"stage": result.stage, "final": str(result.final_dir), "logs": str(result.log_dir)})


@train_app.command("all")
@user_errors
def train_all(
    config_dir: Annotated[Path, typer.Option(help="Folder with stage0_naive … stage3_lownfe YAML.")] = Path(
        "configs/train/tiny"
    ),
    set_: SetOption = None,
    stages: Annotated[str | None, typer.Option(help="Comma-separated subset of stages to run.")] = None,
    address: AddressOption = None,
) -> None:
    """Chain stage0 → stage1 → stage2 → stage3, each from the previous final checkpoint."""
    from dimoe.train.launcher import load_curriculum, run_curriculum

    configs = load_curriculum(config_dir, set_ or [])
    results = run_curriculum(configs, stages=stages.split(",") if stages else None, address=address)
    print_json([{"stage": r.stage, "final": str(r.final_dir)} for r in results])


@tune_app.command("run")
@user_errors
def tune_run(
    config: Annotated[Path, typer.Option(help="Tune grid YAML.")] = Path("configs/tune/ablations.yaml"),
    set_: SetOption = None,
    variants: Annotated[
        str | None, typer.Option(help="Comma-separated variants or groups (default: the config's `run`).")
    ] = None,
    restart: Annotated[bool, typer.Option(help="Start the grid over instead of resuming it.")] = False,
    address: AddressOption = None,
) -> None:
    """Train, evaluate (best, fast) and diagnose every variant; write results.csv / results.md."""
    from dimoe.config.loader import load_config
    from dimoe.config.tune import TuneConfig
    from dimoe.io import ensure_ray
    from dimoe.tune import run_grid
    from dimoe.tune.ablations import local_cluster_cpus

    cfg = load_config(config, TuneConfig, set_ or [])
    ensure_ray(address, num_cpus=None if address else local_cluster_cpus(cfg))
    result = run_grid(cfg, variants.split(",") if variants else None, restart=restart)
    console.print(Path(result["markdown"]).read_text(), highlight=False, markup=False)
    print_json({"csv": result["csv"], "markdown": result["markdown"]})


# -- infer -------------------------------------------------------------------------------------------
Preset = Annotated[str | None, typer.Option(help="fast | mid | best (8 / 16 / 32 steps).")]
Strategy = Annotated[str | None, typer.Option(help="threshold (default) | llada.")]
Cache = Annotated[
    str | None,
    typer.Option(help="none | prefix (exact prompt cache; the presets' default) | block (approximate)."),
]
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
    cache: Cache = None,
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
                 "temperature": temperature, "threshold": threshold, "batch_size": batch_size,
                 "cache": cache}  # fmt: skip
    summary = run_generate(
        checkpoint, input, out, preset, overrides, progress=True, config_path=config, set_overrides=set_ or []
    )
    print_json(summary)


@infer_app.command("compare-styles")
@user_errors
def infer_compare_styles(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint directory.")],
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt (repeatable).")] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="Text file, one prompt per line.")] = None,
    gen_length: int = 64,
    block_length: int = 32,
    threshold: float = 0.9,
) -> None:
    """LLaDA-1.0-style (`llada`, one token per step) vs LLaDA-2.0-style (block + threshold)
    decoding of the same prompts: outputs, NFE, tokens/s, tokens per forward."""
    from rich.table import Table

    from dimoe.infer.styles import compare_styles

    prompts = list(prompt or []) + (prompts_file.read_text().splitlines() if prompts_file else [])
    if not [p for p in prompts if p.strip()]:
        raise UserError("give --prompt (repeatable) or --prompts-file")
    report = compare_styles(checkpoint, [p for p in prompts if p.strip()], gen_length=gen_length,
                            block_length=block_length, threshold=threshold)  # fmt: skip
    styles = [name for name in report if name.startswith("llada-")]
    table = Table("", *styles, title=f"{checkpoint} ({report['attention']} attention)")
    for key in ("mean_nfe", "tokens_per_s", "tokens_per_forward"):
        table.add_row(key, *(f"{report[s][key]:.2f}" for s in styles))
    for i, text in enumerate(prompts[:5]):
        table.add_row(f"output {i}: {text[:30]}", *(repr(report[s]["outputs"][i][:60]) for s in styles))
    Console(stderr=True).print(table)
    print_json(report)


@infer_app.command("benchmark")
@user_errors
def infer_benchmark(
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint (offline benchmark of the engine).")
    ] = None,
    dataset_jsonl: Annotated[
        Path | None, typer.Option(help="Prompt file (same rows as `infer generate`).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Where to write bench.json.")] = Path("bench.json"),
    preset: Preset = "mid",
    strategy: Strategy = None,
    cache: Cache = None,
    batch_size: int | None = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N prompts.")] = None,
    config: InferConfigOpt = None,
    set_: SetOption = None,
    serve_url: Annotated[
        str | None, typer.Option(help="Benchmark a running server instead (http:// or grpc://).")
    ] = None,
    concurrency: Annotated[
        str, typer.Option(help="With --serve-url: comma-separated client counts.")
    ] = "1,8,32",
    requests: Annotated[int, typer.Option(help="With --serve-url: requests per concurrency level.")] = 200,
    max_tokens: Annotated[int, typer.Option(help="With --serve-url: tokens each request asks for.")] = 16,
    api_key: Annotated[
        str | None, typer.Option(help="With --serve-url: bearer token (default: DIMOE_API_KEY).")
    ] = None,
) -> None:
    """Offline: latency, tokens/s, NFE and NFE × active params of the strategy beside `llada`.
    With --serve-url: a Ray actor drives load against the server and reports percentiles; the exit
    code is 1 when any request failed."""
    if serve_url is not None:
        from dimoe.io import write_json
        from dimoe.serving.load import format_table, run_serve_benchmark

        levels = [int(c) for c in concurrency.split(",")]
        report = run_serve_benchmark(
            serve_url, levels, requests, preset=preset, max_tokens=max_tokens, api_key=api_key
        )
        write_json(out, report)
        table = format_table({f"{lv['concurrency']} clients": lv for lv in report["levels"]})
        console.print(table, markup=False, highlight=False)
        print_json(report)
        if any(level["errors"] for level in report["levels"]):
            raise typer.Exit(1)
        return
    if checkpoint is None or dataset_jsonl is None:
        raise UserError("give --checkpoint and --dataset-jsonl (offline benchmark) or --serve-url (server)")
    from dimoe.infer.benchmark import run_benchmark

    print_json(
        run_benchmark(
            checkpoint, dataset_jsonl, preset, strategy, out=out, batch_size=batch_size, limit=limit,
            overrides={"cache": cache} if cache else None, config_path=config, set_overrides=set_ or [],
        )
    )  # fmt: skip


@infer_app.command("serve")
@user_errors
def infer_serve(
    checkpoint: Annotated[Path, typer.Option(help="HF-format checkpoint directory.")],
    port: Annotated[int | None, typer.Option(help="HTTP port (default from the serve config: 8000).")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port (default from the serve config).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Serve config YAML.")] = None,
    set_: SetOption = None,
) -> None:
    """Serve a checkpoint with Ray Serve: OpenAI-compatible REST, native REST and gRPC, until Ctrl-C."""
    from dimoe.serving.server import start_server

    start_server(
        checkpoint, config=config, set_overrides=set_ or [], host=host, http_port=port, grpc_port=grpc_port
    )


# -- eval --------------------------------------------------------------------------------------------
@eval_app.command("run")
@user_errors
def eval_run(
    out_dir: Annotated[Path, typer.Option(help="Output folder, e.g. artifacts/eval/mid.")],
    checkpoint: Annotated[Path | None, typer.Option(help="HF-format checkpoint directory.")] = None,
    config: Annotated[Path, typer.Option(help="Eval config.")] = Path("configs/eval/default.yaml"),
    suite: Annotated[str, typer.Option(help="Suite name from the config, or one task name.")] = "demo",
    preset: Preset = "mid",
    strategy: Strategy = None,
    cache: Cache = None,
    threshold: Annotated[
        float | None, typer.Option(help="Confidence to reveal a token early (threshold strategy).")
    ] = None,
    gen_length: Annotated[
        int | None, typer.Option(help="Response tokens for every task (default: each task's gen_length).")
    ] = None,
    infer_config: Annotated[
        Path | None, typer.Option(help="Decoding presets (default: configs/infer/default.yaml's).")
    ] = None,
    num_actors: Annotated[int, typer.Option(help="Decoding actors (one per GPU on a cluster).")] = 1,
    num_gpus: Annotated[float, typer.Option(help="GPUs per decoding actor.")] = 0.0,
    batch_size: int = 16,
    serve_url: Annotated[
        str | None, typer.Option(help="Evaluate the model served here instead of a checkpoint.")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="With --serve-url: requests in flight.")] = 16,
    api_key: Annotated[
        str | None, typer.Option(help="With --serve-url: bearer token (default: DIMOE_API_KEY).")
    ] = None,
    set_: SetOption = None,
    address: AddressOption = None,
) -> None:
    """Run every task of a suite with the batched decoder, distributed over Ray, or through a
    served model (--serve-url); resumable."""
    from dimoe.config.eval import EvalConfig
    from dimoe.config.infer import InferConfig
    from dimoe.config.loader import load_config
    from dimoe.eval.endpoint import Endpoint
    from dimoe.eval.runner import run_eval
    from dimoe.serving.http import resolve_api_key

    cfg = load_config(config, EvalConfig, set_ or [])
    presets = load_config(infer_config, InferConfig) if infer_config is not None else None
    endpoint = None
    if serve_url is not None:
        endpoint = Endpoint(serve_url, resolve_api_key(api_key), concurrency)
    else:
        _connect_ray(address)
    scores = run_eval(
        cfg, suite, preset, checkpoint, out_dir, strategy=strategy,
        overrides={"threshold": threshold, "gen_length": gen_length, "cache": cache}, infer_config=presets,
        num_actors=num_actors, num_gpus=num_gpus, batch_size=batch_size, endpoint=endpoint, progress=True,
    )  # fmt: skip
    print_json(scores)


@eval_app.command("score")
@user_errors
def eval_score(
    task: Annotated[str, typer.Option(help="Registered task name.")],
    pred: Annotated[Path, typer.Option(help="Predictions JSONL (id, prediction, gold fields).")],
    out: Annotated[Path, typer.Option(help="Output folder (results.jsonl, summary.json).")],
    gt: Annotated[Path | None, typer.Option(help="Ground-truth file merged by id.")] = None,
) -> None:
    """Score predictions made anywhere with a task's published metric."""
    from dimoe.eval.runner import score_file

    print_json(score_file(task, pred, gt, out))


@eval_app.command("summarize")
@user_errors
def eval_summarize(
    eval_dir: Annotated[list[Path], typer.Option(help="Eval output folder(s), or their parent.")],
    out_dir: Annotated[Path, typer.Option(help="Where the Markdown and CSV go.")],
) -> None:
    """Markdown + CSV tables across tasks, presets and strategies."""
    from dimoe.eval.summarize import summarize

    print_json(summarize(eval_dir, out_dir))


@tools_app.command("export-paper-tables")
@user_errors
def tools_export_paper_tables(
    eval_dir: Annotated[Path, typer.Option(help="Root of the eval output folders.")],
    out_dir: Annotated[Path, typer.Option(help="Output folder.")] = Path("artifacts/results/paper"),
    tune_results: Annotated[
        Path | None, typer.Option(help="Ablation results CSV from `dimoe tune run`.")
    ] = None,
) -> None:
    """LaTeX (booktabs) and Markdown tables: main results per preset, ablations."""
    from dimoe.eval.paper import export_paper_tables

    print_json(export_paper_tables(eval_dir, out_dir, tune_results))


@tools_app.command("merge-checkpoints")
@user_errors
def tools_merge_checkpoints(
    run: Annotated[Path, typer.Option(help="A stage folder of `dimoe train run` (<output_dir>/<stage>).")],
    top_k: Annotated[int, typer.Option(help="How many of the best checkpoints to average.")] = 3,
    metric: Annotated[str, typer.Option(help="Reported metric that ranks the checkpoints.")] = "val_loss",
    mode: Annotated[str, typer.Option(help="min or max: which end of the metric is best.")] = "min",
    out: Annotated[Path | None, typer.Option(help="Output checkpoint folder (default <run>/merged).")] = None,
) -> None:
    """Average the weights of a run's top-k checkpoints by a metric (LLaDA2.0's merge)."""
    from dimoe.train.merge import merge_top_k

    if mode not in ("min", "max"):
        raise UserError(f"--mode {mode!r}: expected min or max")
    print_json(merge_top_k(run, top_k, metric, mode, out))


@tools_app.command("grafana-dashboard")
@user_errors
def tools_grafana_dashboard(
    out: Annotated[Path, typer.Option(help="Where the dashboard JSON goes.")] = Path(
        "cluster/grafana/dimoe.json"
    ),
) -> None:
    """Write the Grafana dashboard of the training and serving Ray metrics."""
    from dimoe.dashboards.grafana import write_dashboard

    print_json({"dashboard": str(write_dashboard(out))})


@tools_app.command("push-dashboard")
@user_errors
def tools_push_dashboard(
    grafana_url: Annotated[str, typer.Option(help="Grafana base URL, e.g. http://grafana:3000.")],
    token: Annotated[
        str,
        typer.Option(
            envvar="GRAFANA_TOKEN", show_default=False, help="Service-account token (dashboard write)."
        ),
    ],
    dashboard: Annotated[Path, typer.Option(help="Dashboard JSON to push.")] = Path(
        "cluster/grafana/dimoe.json"
    ),
    folder_uid: Annotated[str | None, typer.Option(help="Grafana folder uid (default: General).")] = None,
) -> None:
    """Create or replace the dashboard on a Grafana server (POST /api/dashboards/db)."""
    from dimoe.dashboards.grafana import load_dashboard, push_dashboard

    print_json(push_dashboard(grafana_url, token, load_dashboard(dashboard), folder_uid=folder_uid))


# -- diag --------------------------------------------------------------------------------------------
CompareOpt = Annotated[Path | None, typer.Option(help="A second run's log, shown side by side.")]


@diag_app.command("routing")
@user_errors
def diag_routing_cmd(
    log: Annotated[Path, typer.Option(help="routing_stats.jsonl (or its logs/ or stage folder).")],
    out_dir: Annotated[Path, typer.Option(help="Output folder.")],
    compare: CompareOpt = None,
) -> None:
    """A (non-stationarity), B (view consistency), C (specialisation)."""
    from dimoe.diag import diag_routing

    print_json(diag_routing(log, out_dir, compare))


@diag_app.command("supervision")
@user_errors
def diag_supervision_cmd(
    manifest: Annotated[Path, typer.Option(help="Blend Parquet folder or JSONL with answer_length.")],
    out_dir: Annotated[Path, typer.Option(help="Output folder.")],
    t_sampler: Annotated[str, typer.Option(help="uniform | band | stratified | logit_normal.")] = "uniform",
    views: Annotated[str, typer.Option(help="single | independent | mirror | complementary.")] = "single",
    train_log: Annotated[
        Path | None, typer.Option(help="train_metrics.jsonl for the observed value.")
    ] = None,
    compare: CompareOpt = None,
) -> None:
    """D: probability that a sample gets no supervised token, closed form and observed."""
    from dimoe.diag import diag_supervision

    print_json(
        diag_supervision(manifest, out_dir, t_sampler, views=views, train_log=train_log, compare=compare)
    )


@diag_app.command("gradient")
@user_errors
def diag_gradient_cmd(
    log: Annotated[Path, typer.Option(help="gradient_stats.jsonl (or its logs/ or stage folder).")],
    out_dir: Annotated[Path, typer.Option(help="Output folder.")],
    compare: CompareOpt = None,
) -> None:
    """E (vision/backbone gradient ratio) and F (per-expert gradient spread)."""
    from dimoe.diag import diag_gradient

    print_json(diag_gradient(log, out_dir, compare))


@diag_app.command("ppots")
@user_errors
def diag_ppots_cmd(
    log: Annotated[Path, typer.Option(help="ppots.jsonl (or its logs/ or stage folder).")],
    out_dir: Annotated[Path, typer.Option(help="Output folder.")],
    compare: CompareOpt = None,
) -> None:
    """P-POTS: the estimated loss over t and the proposal it fitted (timesteps.kind ppots)."""
    from dimoe.diag import diag_ppots

    print_json(diag_ppots(log, out_dir, compare))


@app.command("quickstart")
@user_errors
def quickstart(
    fast: Annotated[bool, typer.Option(help="Shorter budgets (CI).")] = False,
    root: Annotated[Path, typer.Option(help="Where artifacts go.")] = Path("artifacts"),
    restart: Annotated[bool, typer.Option(help="Redo finished steps instead of skipping them.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the data, the initial weights and training.")] = 0,
) -> None:
    """Run the whole platform end to end on this machine (tiny model, built-in data, local Ray)."""
    from dimoe.quickstart import run_quickstart

    run_quickstart(root, fast=fast, restart=restart, seed=seed)


def main() -> None:
    app(prog_name="dimoe")


if __name__ == "__main__":
    main()
