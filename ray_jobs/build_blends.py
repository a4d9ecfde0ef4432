"""Build the seeded per-stage training blends on a running Ray cluster:

    ray job submit --working-dir . -- python ray_jobs/build_blends.py \\
        --config configs/data/stage_blends.yaml [--set data_dir=artifacts/data/v1 ...]
"""

import argparse
import json
import os

import ray

from dimoe.config.data import BlendConfig
from dimoe.config.loader import ConfigError, load_config
from dimoe.data.blend import build_stage_blends


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    try:
        config = load_config(args.config, BlendConfig, args.overrides)
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))
        report = build_stage_blends(config)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(
        json.dumps(
            {name: {"rows": b["rows"], "files": len(b["files"])} for name, b in report["blends"].items()}
        )
    )


if __name__ == "__main__":
    main()
