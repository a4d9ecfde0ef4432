"""Run (or resume) the ablation grid on a running Ray cluster:

ray job submit --working-dir . -- python ray_jobs/tune_ablations.py --config configs/tune/ablations.yaml
"""

import argparse

import ray

from dimoe.config.loader import load_config
from dimoe.config.tune import TuneConfig
from dimoe.tune import run_grid


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tune/ablations.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--variants", help="Comma-separated variants or groups (default: `run`).")
    parser.add_argument("--restart", action="store_true", help="Start the grid over instead of resuming it.")
    args = parser.parse_args()
    cfg = load_config(args.config, TuneConfig, args.overrides)
    ray.init(address="auto")
    result = run_grid(cfg, args.variants.split(",") if args.variants else None, restart=args.restart)
    print(open(result["markdown"]).read())
    print(f"results: {result['csv']}")


if __name__ == "__main__":
    main()
