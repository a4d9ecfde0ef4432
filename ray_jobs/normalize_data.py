"""`dimoe data normalize` as a Ray job (same flags, same help).

Normalize raw conversations + images into per-stage Parquet.

    ray job submit --working-dir . -- python ray_jobs/normalize_data.py \\
        --in data/raw --out artifacts/data/v1 --tokenizer artifacts/tokenizer \\
        [--datasets-root data/raw] [--config configs/data/normalize.yaml] [--set KEY=VALUE ...]
"""

from dimoe.cli import run_command

if __name__ == "__main__":
    run_command("data", "normalize")
