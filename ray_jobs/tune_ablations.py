"""`dimoe tune run` as a Ray job (same flags, same help): run (or resume) the ablation grid on Ray Tune.

ray job submit --working-dir . -- python ray_jobs/tune_ablations.py --config configs/tune/ablations.yaml
"""

from dimoe.cli import run_command

if __name__ == "__main__":
    run_command("tune", "run")
