"""`dimoe train run` as a Ray job (same flags, same help): train one curriculum stage.

    ray job submit --working-dir . -- python ray_jobs/train_stage.py \\
        --stage stage2_full --config configs/train/stage2_full.yaml [--set KEY=VALUE ...]
"""

from dimoe.cli import run_command

if __name__ == "__main__":
    run_command("train", "run")
