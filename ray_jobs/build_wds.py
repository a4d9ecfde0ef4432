"""`dimoe data build-wds` as a Ray job (same flags, same help).

Write one blend as WebDataset tar shards.

    ray job submit --working-dir . -- python ray_jobs/build_wds.py \\
        --config configs/data/webdataset.yaml --set source=/mnt/shared/data/v1/blends/stage2_full
"""

from dimoe.cli import run_command

if __name__ == "__main__":
    run_command("data", "build-wds")
