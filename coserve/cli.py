"""The `coserve` command line: `coserve demo`, `coserve bench inference|finetune|coserving`, and the
Ray cluster commands `coserve serve` / `coserve finetune` (in `coserve.cli_cluster`)."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from coserve.cli_cluster import add_cluster_commands


def _demo(args: argparse.Namespace) -> int:
    from coserve.demo import run_demo

    if args.offline:
        run_demo(offline=True, max_tokens=args.max_tokens, device=args.device)
    else:
        run_demo(duration=args.duration, host=args.host, port=args.port, device=args.device,
                 max_tokens=args.max_tokens)
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.cluster and args.what != "coserving":
        raise SystemExit(f"--cluster applies to `coserve bench coserving` only, not {args.what!r}")
    _make_benchmarks_importable()
    if args.what == "inference":
        from benchmarks.inference import run_inference_benchmark

        result = run_inference_benchmark(quick=args.quick, device=args.device, skip_real=args.skip_real)
    elif args.what == "finetune":
        from benchmarks.finetune import run_finetune_benchmark

        result = run_finetune_benchmark(quick=args.quick, device=args.device)
    elif args.what == "coserving" and args.cluster:
        from benchmarks.coserving_cluster import run_cluster_coserving_benchmark

        result = run_cluster_coserving_benchmark(quick=args.quick, device=args.device)
    elif args.what == "coserving":
        from benchmarks.coserving import run_coserving_benchmark

        result = run_coserving_benchmark(quick=args.quick, device=args.device)
    else:  # argparse restricts choices
        raise AssertionError(args.what)
    print(json.dumps(result, indent=2))
    return 0


def _make_benchmarks_importable() -> None:
    # Benchmarks live in the repository's benchmarks/ folder, beside the coserve package.
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if (root / "benchmarks").is_dir() and str(root) not in sys.path:
        sys.path.insert(0, str(root))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coserve", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the server on SmolLM2-135M-Instruct: chat traffic through the OpenAI "
                                       "API while an adapter is fine-tuned on made-up product facts")
    demo.add_argument("--duration", type=float, default=None,
                      help="seconds to keep serving after the summary (default: until Ctrl-C; 0 = stop at once)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000, help="a free port is used if this one is taken")
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--offline", action="store_true",
                      help="the Python API alone: batched multi-adapter generation and a co-served job, no server")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="run a benchmark and print one JSON object")
    bench.add_argument("what", choices=["inference", "finetune", "coserving"])
    bench.add_argument("--quick", action="store_true", help="a smaller run (at most about 3 minutes)")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--skip-real", action="store_true", help="skip the SmolLM2 part (key `real`)")
    bench.add_argument("--cluster", action="store_true",
                       help="coserving only: run every mode through cluster.Deployment on a local Ray")
    bench.set_defaults(func=_bench)

    add_cluster_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
