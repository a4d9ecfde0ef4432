"""Normalize raw conversations + images into per-stage Parquet on a running Ray cluster: the `dimoe data normalize` command, same flags and help.

    ray job submit --working-dir . -- python ray_jobs/normalize_data.py \\
        --in data/raw --out artifacts/data/v1 --tokenizer artifacts/tokenizer \\
        [--datasets-root data/raw] [--config configs/data/normalize.yaml] [--set KEY=VALUE ...]
"""

from dimoe.cli import run_command

if __name__ == "__main__":
    run_command("data", "normalize")
