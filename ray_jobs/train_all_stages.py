"""`dimoe train all` as a Ray job (same flags, same help).

Train the whole curriculum (stage0 → stage3, chained).

    ray job submit --working-dir . -- python ray_jobs/train_all_stages.py --config-dir configs/train
"""

from dimoe.cli import run_command

if __name__ == "__main__":
    run_command("train", "all")
