"""``python -m bench run [--quick] [--models digits,minilm] [--json PATH]``;
``python -m bench soak [--minutes 10]`` (worker memory over a long mixed run);
``python -m bench fetch`` (inferq's Redis transport against kombu's);
``python -m bench http [--models digits] [--seconds 5]`` (native and HTTP online rows);
``python -m bench tracing`` (CPU per job of the tracing hooks, off and on);
``python -m bench brokers [--rows 100000]`` (bulk and single jobs through Redis and SQS)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bench.config import MODELS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure every mode and print the table")
    run.add_argument("--quick", action="store_true",
                     help="small sizes (under 2 minutes); producer memory on 200k rows")
    run.add_argument("--models", default=",".join(MODELS),
                     help=f"comma list of {', '.join(MODELS)} (default: all)")
    run.add_argument("--json", type=Path, default=None,
                     help="where to write the results (default bench/results/<UTC time>.json)")
    run.add_argument("--log-level", default="WARNING")
    soak = sub.add_parser("soak", help="worker RSS over a long run of bulk + online traffic")
    soak.add_argument("--minutes", type=float, default=10.0)
    soak.add_argument("--json", type=Path, default=None, help="write the RSS samples here")
    soak.add_argument("--log-level", default="WARNING")
    fetch = sub.add_parser("fetch", help="inferq's reliable Redis fetch against kombu's")
    fetch.add_argument("--messages", type=int, default=20_000)
    fetch.add_argument("--rounds", type=int, default=3)
    fetch.add_argument("--log-level", default="WARNING")
    http = sub.add_parser("http", help="native online rows, then the same over HTTP")
    http.add_argument("--models", default=",".join(MODELS))
    http.add_argument("--seconds", type=float, default=5.0)
    http.add_argument("--log-level", default="WARNING")
    tracing = sub.add_parser("tracing", help="CPU per job of the tracing hooks, off and on")
    tracing.add_argument("--jobs", type=int, default=20_000)
    tracing.add_argument("--log-level", default="WARNING")
    brokers = sub.add_parser("brokers", help="bulk and single digits jobs: Redis vs SQS")
    brokers.add_argument("--rows", type=int, default=100_000)
    brokers.add_argument("--singles", type=int, default=50)
    brokers.add_argument("--log-level", default="WARNING")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "fetch":
        from bench.fetch import fetch

        return fetch(args.messages, args.rounds)
    if args.command == "brokers":
        from bench.brokers import brokers

        return brokers(args.rows, args.singles)
    if args.command == "tracing":
        from bench.tracing import tracing_cost

        return tracing_cost(args.jobs)
    if args.command == "http":
        from bench.http import http_only

        return http_only([m.strip() for m in args.models.split(",") if m.strip()],
                         args.seconds)
    if args.command == "soak":
        from bench.soak import soak

        return soak(args.minutes, json_path=args.json)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown or not names:
        print(f"error: --models: unknown {unknown}; choose from {', '.join(MODELS)}",
              file=sys.stderr)
        return 2
    from bench.run import run_all

    return run_all(names, quick=args.quick, json_path=args.json)


if __name__ == "__main__":
    sys.exit(main())
