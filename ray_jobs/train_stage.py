"""Train one stage on a running Ray cluster:

    ray job submit --working-dir . -- python ray_jobs/train_stage.py \\
        --stage stage2_full --config configs/train/stage2_full.yaml [--set key=value ...]
"""

import argparse

import ray

from dimoe.config.loader import load_config
from dimoe.config.train import TrainConfig
from dimoe.train.launcher import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stage", required=True, help="stage name; must match the config's `stage`")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.config, TrainConfig, args.overrides)
    if cfg.stage != args.stage:
        parser.error(f"--stage {args.stage} does not match the config's stage {cfg.stage!r}")
    ray.init(address="auto")
    result = run_stage(cfg)
    print(f"{result.stage}: final checkpoint {result.final_dir}")


if __name__ == "__main__":
    main()
