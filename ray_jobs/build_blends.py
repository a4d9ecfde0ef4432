"""Build the seeded per-stage training blends on a running Ray cluster: the `dimoe data build-stage-blends` command, same flags and help.

    ray job submit --working-dir . -- python ray_jobs/build_blends.py \\
        --config configs/data/stage_blends.yaml [--set data_dir=artifacts/data/v1 ...]
"""

from dimoe.cli import run_command

if __name__ == "__main__":
    run_command("data", "build-stage-blends")
