"""Training-step throughput of the tiny model on 2 Ray Train workers (CPU, DeepSpeed):
complementary views versus a single view, ZeRO-0 versus ZeRO-2, the MoE layer's grouped-GEMM
expert dispatch versus its per-expert loop (`moe_dispatch`, same results), and the scale toolkit:
full training versus LoRA versus gradient checkpointing. Prints one table: tokens/s, the peak
memory of rank 0 (its process's peak resident set on CPU, peak CUDA allocation on a GPU) and the
mean training loss of the last logged steps beside each.

Needs a blend (run `dimoe data synth` → `normalize` → `build-stage-blends` first, or `make demo`):

    python benchmarks/train_step.py [--data-dir artifacts/data/v1] [--tokenizer artifacts/data/demo/tokenizer]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import ray

from dimoe.config.loader import load_config, resolve_config_path
from dimoe.config.train import TrainConfig
from dimoe.train.launcher import run_stage

# name: (train overrides, the model's moe_dispatch)
VARIANTS = {
    "single view, ZeRO-2": (
        ["diffusion.views=single", "losses.lambda_cons=0", "deepspeed.zero_stage=2"],
        "auto",
    ),
    "complementary, ZeRO-2": (["diffusion.views=complementary", "deepspeed.zero_stage=2"], "auto"),
    "complementary, ZeRO-0": (["diffusion.views=complementary", "deepspeed.zero_stage=0"], "auto"),
    "complementary, ZeRO-2, loop experts": (
        ["diffusion.views=complementary", "deepspeed.zero_stage=2"],
        "loop",
    ),
    "LoRA r=8 (attention + experts), ZeRO-2": (
        [
            "diffusion.views=complementary",
            "deepspeed.zero_stage=2",
            "lora={r: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj, experts.gate_up_proj, "
            "experts.down_proj]}",
        ],
        "auto",
    ),
    "gradient checkpointing, ZeRO-2": (
        ["diffusion.views=complementary", "deepspeed.zero_stage=2", "gradient_checkpointing=true"],
        "auto",
    ),
}


def model_config(out: Path, dispatch: str) -> Path:
    """configs/model/tiny.yaml with this expert dispatch."""
    path = out / "model.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tiny = resolve_config_path("configs/model/tiny.yaml").resolve()
    path.write_text(f"base: {tiny}\nmoe_dispatch: {dispatch}\n")
    return path


def measure(overrides: list[str], dispatch: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    cfg = load_config(
        "configs/train/tiny/stage2_full.yaml",
        TrainConfig,
        [
            f"data.data_dir={args.data_dir}",
            f"tokenizer={args.tokenizer}",
            f"model={model_config(out, dispatch)}",
            f"output_dir={out}",
            "init_from=null",
            "requires_init=false",
            f"max_steps={args.steps}",
            f"batch_size={args.batch_size}",
            "log_every=5",
            f"checkpoint.every_steps={10**6}",
            *overrides,
        ],
    )
    run_stage(cfg)
    records = [json.loads(x) for x in (out / cfg.stage / "logs/train_metrics.jsonl").read_text().splitlines()]
    steady = records[1:] or records  # the first window includes DeepSpeed start-up
    return {
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in steady),
        "samples_per_step": records[-1]["samples"] * 2,
        "supervised_tokens": statistics.mean(r["masked_tokens"] for r in steady),
        "peak_memory_mb": records[-1]["peak_memory_mb"],
        "final_loss": statistics.mean(r["loss"] for r in records[-3:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="artifacts/data/v1")
    parser.add_argument("--tokenizer", default="artifacts/data/demo/tokenizer")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="samples per worker per step")
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (overrides, dispatch)) in enumerate(VARIANTS.items()):
            if not args.only or name in args.only or i == 0:  # the first is every ratio's base
                rows[name] = measure(overrides, dispatch, args, Path(tmp) / str(i))
    base = rows["single view, ZeRO-2"]["tokens_per_s"]
    print(f"load average after: {os.getloadavg()}")
    header = f"{'variant':<42}{'tokens/s':>10}{'vs single':>11}{'supervised tok/step':>21}"
    print(f"\n{header}{'peak MB':>10}{'final loss':>12}")
    for name, r in rows.items():
        ratio = r["tokens_per_s"] / base
        print(
            f"{name:<42}{r['tokens_per_s']:>10.0f}{ratio:>10.2f}x{r['supervised_tokens']:>21.0f}"
            f"{r['peak_memory_mb']:>10.0f}{r['final_loss']:>12.3f}"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
