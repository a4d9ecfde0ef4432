"""The MiniMind → LLaDA2.0 route at the tiny scale, on the demo's text (arithmetic and sorting
chats), on 2 Ray Train workers:

  1. AR pretraining of a causal tiny DiMoE model (`objective: ar`);
  2. `dimoe model convert-ar --attention block`: the same weights under the block mask;
  3. WSD block-diffusion pretraining from the converted weights, and the same run from scratch
     (same model, data, steps and held-out rows): the held-out loss of each at every validation;
  4. block-diffusion SFT at the final block size, then the top-k merge of its checkpoints;
  5. both decoding styles (`compare-styles`) on held-out questions, with their exact match.

Needs the demo's normalized data (`make demo`, or `dimoe data synth` → `normalize`):

    python benchmarks/ar_route.py --data-dir artifacts/data/v1 --tokenizer artifacts/data/demo/tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import ray

from dimoe.config.data import BlendConfig
from dimoe.config.loader import load_config, resolve_config_path
from dimoe.config.model import ModelConfig
from dimoe.config.train import TrainConfig
from dimoe.data.blend import build_stage_blends
from dimoe.infer.styles import compare_styles
from dimoe.model.causal_lm import convert_causal_lm
from dimoe.train.launcher import run_stage
from dimoe.train.merge import merge_top_k


def text_blend(data_dir: Path, out: Path, size: int) -> None:
    """`<out>/data/blends/text`: the demo's text chats (stage2_llm, train split)."""
    spec = {"sources": {"stage2_llm": 1}, "size": size, "replace": False, "seed": 5}
    config = BlendConfig.model_validate(
        {"data_dir": str(data_dir), "out_dir": str(out / "data" / "blends"), "progress": False,
         "blends": {"text": spec}}
    )  # fmt: skip
    build_stage_blends(config)


def stage(args: argparse.Namespace, name: str, steps: int, *overrides: str) -> TrainConfig:
    common = [f"data.data_dir={args.out / 'data'}", "data.blend=text", f"output_dir={args.out}",
              f"stage={name}", f"max_steps={steps}", "batch_size=16",
              "data.response_length=32", "log_every=10", "validation.fraction=0.05", "validation.max_rows=64",
              f"validation.every_steps={max(steps // 5, 1)}", "checkpoint.keep=3",
              "groups.backbone.lr=2e-3", "groups.router.lr=2e-3", "schedule.warmup_steps=10"]  # fmt: skip
    return load_config("configs/train/tiny/stage0_naive.yaml", TrainConfig, [*common, *overrides])


def val_curve(result) -> dict[int, float]:
    records = [json.loads(x) for x in (result.log_dir / "train_metrics.jsonl").read_text().splitlines()]
    return {r["step"]: round(r["val_loss"], 4) for r in records if "val_loss" in r}


def heldout_questions(data_dir: Path, count: int) -> list[tuple[str, str]]:
    """(question, answer) of single-turn text chats of the test split."""
    rows = pq.read_table(data_dir / "stage2_llm").to_pylist()
    pairs = []
    for row in rows:
        messages = json.loads(row["messages"])
        turns = [m for m in messages if m["role"] != "system"]
        if row["split"] == "test" and len(turns) == 2:
            pairs.append((turns[0]["content"], turns[1]["content"]))
    return pairs[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("artifacts/data/v1"))
    parser.add_argument("--tokenizer", type=Path, default=Path("artifacts/data/demo/tokenizer"))
    parser.add_argument("--out", type=Path, default=Path("artifacts/route"))
    parser.add_argument("--ar-steps", type=int, default=300)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--questions", type=int, default=32)
    args = parser.parse_args()
    args.data_dir, args.out = args.data_dir.resolve(), args.out.resolve()
    print(f"load average before: {os.getloadavg()}")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    text_blend(args.data_dir, args.out, 1700)
    tiny = resolve_config_path("configs/model/tiny.yaml").resolve()
    for mask in ("causal", "block"):
        (args.out / f"{mask}.yaml").parent.mkdir(parents=True, exist_ok=True)
        (args.out / f"{mask}.yaml").write_text(
            f"base: {tiny}\nattention: {mask}\nblock_size: 8\nvision: null\n"
        )
    fresh = [f"tokenizer={args.tokenizer.resolve()}", "init_from=null", "requires_init=false"]
    ar = run_stage(
        stage(args, "ar", args.ar_steps, *fresh, f"model={args.out / 'causal.yaml'}", "objective=ar")
    )
    base = load_config(args.out / "block.yaml", ModelConfig)
    convert_causal_lm(ar.final_dir, args.out / "converted", base)
    sizes = "warmup_sizes: [8, 16], decay_sizes: [16, 8], phase_ratios: [0.3, 0.5, 0.2]"
    wsd = f"diffusion.block_schedule={{{sizes}}}"
    converted = run_stage(stage(args, "pretrain_converted", args.pretrain_steps, wsd,
                                f"init_from={args.out / 'converted'}"))  # fmt: skip
    scratch = run_stage(stage(args, "pretrain_scratch", args.pretrain_steps, wsd, *fresh,
                              f"model={args.out / 'block.yaml'}"))  # fmt: skip
    sft = run_stage(
        stage(args, "sft", args.sft_steps, "diffusion.block_size=8", f"init_from={converted.final_dir}")
    )
    merged = merge_top_k(sft.final_dir.parent, 3, out=args.out / "merged")
    questions = heldout_questions(args.data_dir, args.questions)
    styles = compare_styles(merged["out"], [q for q, _ in questions], gen_length=32, block_length=8)
    print(f"load average after: {os.getloadavg()}")
    print("\nheld-out diffusion loss by step (WSD pretraining)")
    print(f"  from the AR weights: {val_curve(converted)}")
    print(f"  from scratch:        {val_curve(scratch)}")
    print(f"AR held-out loss: {val_curve(ar)}; SFT: {val_curve(sft)}; merged {merged['checkpoints']}")
    print(f"\n{'style':<12}{'exact match':>12}{'mean NFE':>10}{'tokens/s':>10}{'tokens/forward':>16}")
    for name in ("llada-1.0", "llada-2.0"):
        row = styles[name]
        hits = sum(
            out.strip() == gold.strip() for out, (_, gold) in zip(row["outputs"], questions, strict=True)
        )
        print(f"{name:<12}{hits / len(questions):>12.3f}{row['mean_nfe']:>10.1f}{row['tokens_per_s']:>10.1f}"
              f"{row['tokens_per_forward']:>16.2f}")  # fmt: skip
    ray.shutdown()


if __name__ == "__main__":
    main()
