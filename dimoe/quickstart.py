"""`dimoe quickstart`: the whole platform end to end on one machine (tiny profile, local Ray).

Each step writes its artifacts under `artifacts/` and a marker `artifacts/quickstart/<step>.done`
(with its result as JSON); a re-run skips finished steps, so an interrupted quickstart continues
where it stopped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from dimoe.config.eval import EvalConfig
from dimoe.config.loader import load_config
from dimoe.config.train import TrainConfig
from dimoe.config.tune import TuneConfig
from dimoe.io import iter_jsonl, read_json, write_json

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
    def demo_dir(self) -> Path:
        return self.root / "data" / "demo"

    @property
    def data_dir(self) -> Path:
        return self.root / "data" / "v1"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def tokenizer_dir(self) -> Path:
        return self.demo_dir / "tokenizer"

    @property
    def naive_dir(self) -> Path:
        """The same-budget naive run (DMAR and EBCMC off) beside the curriculum."""
        return self.root / "train-naive"

    @property
    def init_dir(self) -> Path:
        """The model stage0 starts from: the pretrained tiny tower + a fresh backbone."""
        return self.root / "models" / "dimoe-vl-tiny"


def _synth(ctx: QuickstartContext) -> dict[str, Any]:
    from dimoe.data.synthetic import synthesize

    # 300 test scenes, not the split's 150: about 1,190 VQA questions put the standard error of a
    # run's exact match near 1 point instead of 1.4, against the 2-point seed-to-seed target.
    size, extra_test = (600, 0) if ctx.fast else (3000, 150)
    summary = synthesize(ctx.demo_dir, seed=ctx.seed, size=size, extra_test_scenes=extra_test)
    return {"data": str(ctx.demo_dir), "baselines": summary["baselines"]}


def _normalize_and_blend(ctx: QuickstartContext) -> dict[str, Any]:
    from dimoe.config.data import BlendConfig, NormalizeConfig
    from dimoe.data.blend import build_stage_blends
    from dimoe.data.normalize import normalize

    # Ray Data's own progress output off: the step heading and its JSON result say what happened.
    quiet = NormalizeConfig(progress=False)
    summary = normalize(ctx.demo_dir / "raw", ctx.data_dir, ctx.tokenizer_dir, config=quiet)
    overrides = [f"data_dir={ctx.data_dir}", "progress=false"]
    if ctx.fast:
        overrides += [f"blends.{b}.size={n}" for b, n in BLEND_SIZES_FAST.items()]
    report = build_stage_blends(load_config("configs/data/stage_blends.yaml", BlendConfig, overrides))
    return {
        "normalized": str(ctx.data_dir),
        "rows": summary["totals"],
        "blends": sorted(report.get("blends", report)),
    }


def _pretrain_vision(ctx: QuickstartContext) -> dict[str, Any]:
    """The tiny profile's stand-in for a published SigLIP, then `model init --vision-from` with it."""
    from dimoe.config.model import ModelConfig
    from dimoe.config.train import VisionPretrainConfig
    from dimoe.data.tokenizer import load_tokenizer
    from dimoe.model.build import build_model, save_checkpoint
    from dimoe.train.vision_pretrain import pretrain_vision

    overrides = [f"data_dir={ctx.data_dir}", f"tokenizer={ctx.tokenizer_dir}", f"seed={ctx.seed}",
                 f"out_dir={ctx.root / 'models' / 'tiny-siglip'}"]  # fmt: skip
    if ctx.fast:
        overrides.append(f"steps={VISION_STEPS_FAST}")
    cfg = load_config("configs/vision_pretrain/tiny.yaml", VisionPretrainConfig, overrides)
    summary = pretrain_vision(cfg)
    tokenizer = load_tokenizer(ctx.tokenizer_dir)
    spec = load_config(cfg.model, ModelConfig)
    model = build_model(spec, tokenizer, vision_from=cfg.out_dir, seed=ctx.seed)
    save_checkpoint(model, tokenizer, ctx.init_dir)
    return {"siglip": summary, "init": str(ctx.init_dir)}


VISION_STEPS_FAST = 20
BLEND_SIZES_FAST = {"stage0_naive": 600, "stage1_align": 300, "stage2_full": 600, "stage3_lownfe": 400}
STEPS_FAST = {"stage0_naive": 20, "stage1_align": 6, "stage2_full": 20, "stage3_lownfe": 8}


def _train(ctx: QuickstartContext) -> dict[str, Any]:
    """The curriculum stage0 → stage3, then the same-budget naive run: stages 2 and 3 again from
    the same stage1 weights, on the same data and steps, with DMAR and EBCMC off."""
    from dimoe.train.launcher import load_curriculum, run_curriculum

    common = [f"data.data_dir={ctx.data_dir}", f"tokenizer={ctx.tokenizer_dir}", f"seed={ctx.seed}"]
    # init_from is stage0's start; each later stage continues the previous one
    start = [f"output_dir={ctx.train_dir}", f"init_from={ctx.init_dir.resolve()}"]
    results = run_curriculum(_budgeted(ctx, load_curriculum("configs/train/tiny", [*common, *start])))
    aligned = _final(ctx, "stage1_align").resolve()
    naive = [
        load_config(f"configs/train/tiny/{stage}.yaml", TrainConfig, [
            *common, f"output_dir={ctx.naive_dir}", f"init_from={aligned}", *naive_overrides(stage)])
        for stage in NAIVE_STAGES
    ]  # fmt: skip
    naive_results = run_curriculum(_budgeted(ctx, naive))
    return {
        **{r.stage: str(r.final_dir) for r in results},
        "naive": {r.stage: str(r.final_dir) for r in naive_results},
    }


NAIVE_STAGES = ("stage2_full", "stage3_lownfe")


def naive_overrides(stage: str) -> list[str]:
    """The Tune grid's `naive` variant (configs/tune/ablations.yaml) for `stage`. stage3's high-t
    band belongs to the low-NFE stage, not to EBCMC, so the naive stage3 keeps it (uniform t in
    the band) and its confidence loss."""
    naive = load_config("configs/tune/ablations.yaml", TuneConfig).variants["naive"].set
    return [*naive, "diffusion.timesteps.kind=band"] if stage == "stage3_lownfe" else list(naive)


def _budgeted(ctx: QuickstartContext, configs: list[TrainConfig]) -> list[TrainConfig]:
    if not ctx.fast:
        return configs
    return [c.model_copy(update={"max_steps": STEPS_FAST[c.stage], "log_every": 5}) for c in configs]


PRESETS = ("fast", "mid", "best")
DEMO_TASKS = ("demo_vqa_colour", "demo_vqa_shape", "demo_vqa_count", "demo_vqa_position", "demo_describe")


def _final(ctx: QuickstartContext, stage: str) -> Path:
    return ctx.train_dir / stage / "final"


def _evaluate(ctx: QuickstartContext) -> dict[str, Any]:
    from dimoe.eval.runner import run_eval
    from dimoe.eval.summarize import summarize

    cfg = _eval_config(ctx)
    eval_root = ctx.root / "eval"
    final, naive = _final(ctx, "stage3_lownfe"), ctx.naive_dir / "stage3_lownfe" / "final"
    runs = {f"final/{preset}": (final, preset) for preset in PRESETS} | {"naive/best": (naive, "best")}
    scores = {}
    for label, (checkpoint, preset) in runs.items():
        # Each task decodes its own answer length (tasks.<name>.gen_length of the eval config).
        out = eval_root / label.replace("/", "_")
        result = run_eval(cfg, "demo", preset, checkpoint, out, batch_size=32)
        scores[label] = {task: round(r["score"], 3) for task, r in result["tasks"].items() if "score" in r}
    tables = summarize([eval_root / label.replace("/", "_") for label in runs], ctx.root / "results")
    _print_accuracy_table(scores, _majority_baselines(ctx))
    console.print(f"full tables (with NFE, tokens/s, NFE × active params): {tables['markdown']}")
    return {"scores": scores, "tables": {k: str(v) for k, v in tables.items()}}


def _eval_config(ctx: QuickstartContext) -> EvalConfig:

    overrides = [f"data_root={ctx.demo_dir}"]
    if ctx.fast:
        overrides += [f"tasks.{task}.max_samples=24" for task in DEMO_TASKS]
    return load_config("configs/eval/default.yaml", EvalConfig, overrides)


def _majority_baselines(ctx: QuickstartContext) -> dict[str, float]:
    """Majority-answer accuracy per demo task, computed by the generator on the test split."""
    baselines = read_json(ctx.demo_dir / "synth_summary.json")["baselines"]
    return {
        f"demo_vqa_{kind}" if kind != "describe" else "demo_describe": b["accuracy"]
        for kind, b in baselines.items()
    }


def _print_accuracy_table(scores: dict[str, dict[str, float]], baselines: dict[str, float]) -> None:
    from rich.table import Table

    from dimoe.eval.tasks import get_task

    table = Table(title="the demo test split, each task's own metric; naive = the same budget with "
                  "DMAR and EBCMC off; majority = always the most frequent answer")  # fmt: skip
    table.add_column("task")
    table.add_column("metric")
    for run in scores:
        table.add_column(run, justify="right")
    table.add_column("majority", justify="right")
    for task in DEMO_TASKS:
        cells = [f"{scores[run].get(task, float('nan')):.3f}" for run in scores]
        table.add_row(task, get_task(task).metric, *cells, f"{baselines.get(task, float('nan')):.3f}")
    console.print(table)


def _diagnose(ctx: QuickstartContext) -> dict[str, Any]:
    from dimoe.diag import diag_gradient, diag_routing, diag_supervision

    full, naive, out = (
        ctx.train_dir / "stage2_full" / "logs",
        ctx.naive_dir / "stage2_full" / "logs",
        ctx.root / "diag",
    )
    routing = diag_routing(full, out / "routing", compare=naive)
    supervision = diag_supervision(
        ctx.data_dir / "blends" / "stage2_full", out / "supervision", "stratified",
        views="complementary", train_log=full, compare=naive,
    )  # fmt: skip
    gradient = diag_gradient(full, out / "gradient", compare=naive)
    return {"diag": str(out), "routing": _headline(routing), "supervision": _headline(supervision),
            "gradient": _headline(gradient)}  # fmt: skip


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The headline metrics of a diag summary (side by side when it compares two runs)."""
    if "this" in summary:
        return {run: summary[run].get("headline") for run in ("this", "other")}
    return summary.get("headline", {})


def _serve(ctx: QuickstartContext) -> dict[str, Any]:
    """Start the Serve app, ask one image question over the OpenAI-compatible endpoint and one over
    gRPC, print both answers, shut down."""
    import base64

    import grpc
    from openai import OpenAI

    from dimoe.io import free_ports
    from dimoe.serving.proto import dimoe_pb2, dimoe_pb2_grpc
    from dimoe.serving.server import start_server_background

    _, row = next(iter_jsonl(ctx.demo_dir / "eval" / "vqa_test.jsonl"))
    answer_tokens = _eval_config(ctx).tasks[f"demo_vqa_{row['question_type']}"].gen_length
    image = (ctx.demo_dir / row["image"]).read_bytes()
    http_port, grpc_port = free_ports(2)
    server = start_server_background(_final(ctx, "stage3_lownfe"), http_port=http_port, grpc_port=grpc_port)
    try:
        client = OpenAI(base_url=server.urls()["openai_base_url"], api_key="unused")
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        reply = client.chat.completions.create(
            model=server.config.model_name,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": row["question"]},
            ]}],
            max_tokens=answer_tokens,
            extra_body={"preset": "fast"},
        )  # fmt: skip
        with grpc.insecure_channel(server.grpc_target) as channel:
            request = dimoe_pb2.GenerateRequest(
                prompt=row["question"], image=image, preset="fast", gen_length=answer_tokens
            )
            answer = dimoe_pb2_grpc.DiMoEStub(channel).Generate(request, timeout=120)
    finally:
        server.stop()
    result = {
        "question": row["question"],
        "gold": row["answer"],
        "openai_answer": reply.choices[0].message.content,
        "grpc_answer": answer.text,
        "nfe": answer.nfe,
    }
    console.print(f"[bold]Q:[/] {row['question']}  [bold]OpenAI endpoint:[/] {result['openai_answer']!r}  "
                  f"[bold]gRPC:[/] {result['grpc_answer']!r}  (gold {row['answer']!r})")  # fmt: skip
    return result


STEPS = [
    Step("synth", "generate the built-in data and tokenizer (dimoe data synth)", _synth),
    Step("data", "normalize and build the four stage blends (Ray Data → Parquet)", _normalize_and_blend),
    Step("vision", "pretrain the tiny vision tower (SigLIP), stage0's starting point", _pretrain_vision),
    Step("train", "train stage0 → stage3, and stage2 → stage3 naive (Ray Train + DeepSpeed)", _train),
    Step(
        "eval", "evaluate the final checkpoint at fast / mid / best and the same-budget naive run", _evaluate
    ),
    Step("diag", "diagnostics A–F of the full stage2 versus the naive stage2 (JSON + PNG)", _diagnose),
    Step("serve", "serve the final checkpoint (Ray Serve) and ask over REST and gRPC", _serve),
]


def run_quickstart(
    root: str | Path = "artifacts", *, fast: bool = False, restart: bool = False, seed: int = 0
) -> dict[str, Any]:
    from dimoe.io import ensure_ray

    ctx = QuickstartContext(Path(root), fast, seed)
    ensure_ray(num_cpus=max(os.cpu_count() or 2, 2))
    markers = ctx.root / "quickstart"
    markers.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for i, step in enumerate(STEPS, 1):
        marker = markers / f"{step.name}.done"
        if marker.exists() and not restart:
            results[step.name] = read_json(marker)
            console.print(f"[dim][{i}/{len(STEPS)}] {step.title}: done earlier, skipped[/]")
            continue
        console.rule(f"[{i}/{len(STEPS)}] {step.title}")
        start = time.perf_counter()
        result = step.run(ctx)
        result["seconds"] = round(time.perf_counter() - start, 1)
        write_json(marker, result)
        results[step.name] = result
        # One compact JSON per step (the full result is in the step's marker file): a few lines each.
        console.print_json(data=result, indent=None)
    return results
