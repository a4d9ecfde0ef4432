"""Drive load against a running DiMoE-VL server from a Ray actor and print the report as JSON
(the same as `dimoe infer benchmark --serve-url`; the actor is `dimoe.serving.load.LoadDriver`).

    python serve/benchmark.py --url http://127.0.0.1:8000 --concurrency 1,8,32 --requests 200
    python serve/benchmark.py --url grpc://127.0.0.1:9000 --concurrency 32 --requests 1000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dimoe.serving.load import format_table, run_serve_benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="http://host:port or grpc://host:port")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--api-key", help="bearer token (default: DIMOE_API_KEY)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = run_serve_benchmark(
        args.url,
        [int(level) for level in args.concurrency.split(",")],
        args.requests,
        api_key=args.api_key,
        preset=args.preset,
        max_tokens=args.max_tokens,
    )
    print(
        format_table({f"{level['concurrency']} clients": level for level in report["levels"]}),
        file=sys.stderr,
    )
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(level["errors"] == 0 for level in report["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
