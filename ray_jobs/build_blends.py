"""`dimoe data build-stage-blends` as a Ray job (same flags, same help).

Build the seeded per-stage training blends.

    ray job submit --working-dir . -- python ray_jobs/build_blends.py \\
        --config configs/data/stage_blends.yaml [--set data_dir=artifacts/data/v1 ...]
"""

from dimoe.cli import run_command

if __name__ == "__main__":
    run_command("data", "build-stage-blends")
