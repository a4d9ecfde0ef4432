"""Train one curriculum stage on a running Ray cluster: the `dimoe train run` command, same flags and help.

    ray job submit --working-dir . -- python ray_jobs/train_stage.py \\
        --stage stage2_full --config configs/train/stage2_full.yaml [--set KEY=VALUE ...]
"""

from dimoe.cli import run_command

if __name__ == "__main__":
    run_command("train", "run")
