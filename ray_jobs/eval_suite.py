"""Evaluate a checkpoint on a suite on a running Ray cluster:

    ray job submit --working-dir . -- python ray_jobs/eval_suite.py \\
        --config configs/eval/default.yaml --suite vqa --preset fast \\
        --checkpoint /shared/ckpt/stage3_lownfe/final --out-dir /shared/eval/s3_fast \\
        --num-actors 16 --num-gpus 1 [--strategy llada] [--set key=value ...]
"""

import argparse
import json

import ray

from dimoe.config.eval import EvalConfig
from dimoe.config.infer import InferConfig
from dimoe.config.loader import load_config
from dimoe.eval.runner import run_eval


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="eval config, e.g. configs/eval/default.yaml")
    parser.add_argument("--suite", required=True, help="a suite of the config, or a single task name")
    parser.add_argument("--preset", required=True, help="decoding preset: fast, mid, best, ...")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--strategy", choices=["threshold", "llada"], default=None)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an eval config key (repeatable)",
    )
    parser.add_argument("--infer-config", default=None, help="decoding presets (default: the built-in ones)")
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per decoding actor")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    config = load_config(args.config, EvalConfig, args.overrides)
    infer_config = load_config(args.infer_config, InferConfig)  # None: the schema's default presets
    ray.init(address="auto")
    scores = run_eval(
        config,
        args.suite,
        args.preset,
        args.checkpoint,
        args.out_dir,
        strategy=args.strategy,
        num_actors=args.num_actors,
        batch_size=args.batch_size,
        num_gpus=args.num_gpus,
        infer_config=infer_config,
    )
    print(
        json.dumps(
            {name: entry.get("score", entry.get("reason")) for name, entry in scores["tasks"].items()},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
