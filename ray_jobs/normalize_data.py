"""Normalize raw conversations + images into per-stage Parquet on a running Ray cluster:

    ray job submit --working-dir . -- python ray_jobs/normalize_data.py \\
        --in data/raw --out artifacts/data/v1 --tokenizer artifacts/tokenizer \\
        [--datasets-root data/raw] [--config configs/data/normalize.yaml] [--set key=value ...]
"""

import argparse
import json
import os

import ray

from dimoe.config.data import NormalizeConfig
from dimoe.config.loader import ConfigError, load_config
from dimoe.data.normalize import NormalizeError, normalize


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--in", dest="in_dir", required=True, help="directory of *.json / *.jsonl files")
    parser.add_argument("--out", dest="out_dir", required=True)
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer directory")
    parser.add_argument("--datasets-root", default=None, help="image paths resolve here (default: --in)")
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    try:
        config = load_config(args.config, NormalizeConfig, args.overrides)
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))
        summary = normalize(args.in_dir, args.out_dir, args.tokenizer, args.datasets_root, config)
    except (ConfigError, NormalizeError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(json.dumps(summary["totals"], indent=2))


if __name__ == "__main__":
    main()
