"""The ``epikern`` command.

    epikern bench      kernel benchmark of draft_uncertainty on this machine vs eager PyTorch and
                       torch.compile (the end-to-end TokUR comparison lands with the pipeline)
    epikern backends   which backends can run here, and why not
"""

from __future__ import annotations

import argparse
import sys


def _backends(_args: argparse.Namespace) -> int:
    from . import backends

    for name in backends.BACKENDS:
        try:
            backends.get(name)
            status = "available"
        except backends.BackendUnavailableError as exc:
            status = f"unavailable: {exc}"
        print(f"{name:7s} {status}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .eval import kernel_bench

    return kernel_bench.main(args.bench_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="epikern", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark the uncertainty kernels on this machine",
                           add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER,
                       help="options of the benchmark (see `epikern bench --help`)")
    bench.set_defaults(func=_bench)
    sub.add_parser("backends", help="list the backends and why one is unavailable").set_defaults(
        func=_backends)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
