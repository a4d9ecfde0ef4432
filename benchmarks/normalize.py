"""Throughput of `dimoe data normalize` on Ray Data with 1 and 2 CPUs.

    python benchmarks/normalize.py [--records 20000] [--cpus 1 2] [--work-dir DIR]

Generates the synthetic demo set with `records` raw records (5 per scene), then runs normalize
once per CPU count, each in a fresh subprocess with its own `ray.init(num_cpus=N)` so that the
runs do not share workers, and prints rows/s side by side with the speed-up over the first.
The time is end to end: actor start-up (importing the package and loading the tokenizer),
parse, image verification, tokenization and the Parquet writes; `actor_s` is the actor stage
alone (start-up included). For reference it also prints the rate of the same per-record work
in one plain Python process, without Ray.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECORDS_PER_SCENE = 5  # caption + text task + 2 VQA + joint chat


def run_child(data_dir: Path, cpus: int) -> dict:
    """Inside the subprocess: own Ray instance with `cpus` CPUs, one timed normalize."""
    import ray

    from dimoe.config.data import NormalizeConfig
    from dimoe.data.normalize import normalize

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    config = NormalizeConfig(num_actors=cpus, progress=False)
    start = time.perf_counter()
    summary = normalize(
        data_dir / "raw", data_dir / f"normalized_{cpus}cpu", data_dir / "tokenizer", config=config
    )
    seconds = time.perf_counter() - start
    ray.shutdown()
    rows = summary["totals"]["read"]
    return {
        "cpus": cpus,
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds, 1),
        "process_s": summary["timings_s"]["process"],
    }


def in_process_rate(data_dir: Path, limit: int = 2000) -> float:
    """Records/s of the per-record work (parse, image, tokenize) in this process, no Ray."""
    from dimoe.config.data import NormalizeConfig
    from dimoe.data.normalize import RecordNormalizer, discover_inputs, read_raw_records

    config = NormalizeConfig()
    rows = read_raw_records(discover_inputs(data_dir / "raw", config))[::RECORDS_PER_SCENE][:limit]
    worker = RecordNormalizer(str(data_dir / "tokenizer"), str(data_dir / "raw"), config)
    start = time.perf_counter()
    for row in rows:
        worker.normalize_row(row)
    return len(rows) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_child(args.work_dir, args.child)))
        return

    from dimoe.data.synthetic import synthesize

    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="dimoe_bench_normalize_"))
    start = time.perf_counter()
    synthesize(work_dir, seed=0, size=args.records // RECORDS_PER_SCENE)
    print(f"synthetic set: {args.records} records in {time.perf_counter() - start:.1f}s under {work_dir}")
    print(f"in-process reference (no Ray, 1 core): {in_process_rate(work_dir):.0f} records/s")
    results = []
    for cpus in args.cpus:
        command = [sys.executable, __file__, "--child", str(cpus), "--work-dir", str(work_dir)]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"the {cpus}-CPU run failed:\n{child.stderr[-3000:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    base = results[0]["rows_per_s"]
    print(f"{'cpus':>4} {'rows':>7} {'seconds':>8} {'rows/s':>8} {'speed-up':>8} {'actor_s':>8}")
    for r in results:
        speed_up = r["rows_per_s"] / base
        print(
            f"{r['cpus']:>4} {r['rows']:>7} {r['seconds']:>8} {r['rows_per_s']:>8} {speed_up:>7.2f}x"
            f" {r['process_s']:>8}"
        )


if __name__ == "__main__":
    main()
