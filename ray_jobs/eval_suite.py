"""`dimoe eval run` as a Ray job (same flags, same help): evaluate a checkpoint on a suite.

    ray job submit --working-dir . -- python ray_jobs/eval_suite.py \\
        --config configs/eval/default.yaml --suite vqa --preset fast \\
        --checkpoint /shared/ckpt/stage3_lownfe/final --out-dir /shared/eval/s3_fast \\
        --num-actors 16 --num-gpus 1 [--strategy llada] [--set KEY=VALUE ...]
"""

from dimoe.cli import run_command

if __name__ == "__main__":
    run_command("eval", "run")
