"""Train the whole curriculum (stage0 → stage3, chained) on a running Ray cluster:

ray job submit --working-dir . -- python ray_jobs/train_all_stages.py --config-dir configs/train
"""

import argparse

import ray

from dimoe.train.launcher import load_curriculum, run_curriculum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config-dir", default="configs/train")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    ray.init(address="auto")
    for result in run_curriculum(load_curriculum(args.config_dir, args.overrides)):
        print(f"{result.stage}: final checkpoint {result.final_dir}")


if __name__ == "__main__":
    main()
