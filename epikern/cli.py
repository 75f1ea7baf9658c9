"""The ``epikern`` command.

    epikern bench      kernel benchmark of draft_uncertainty on this machine vs eager PyTorch and
                       torch.compile (the end-to-end TokUR comparison lands with the pipeline)
    epikern backends   which backends can run here, and why not
"""

from __future__ import annotations

import argparse
import sys


def _backends(_args: argparse.Namespace) -> int:
    import os

    import torch

    from . import backends

    for name in backends.BACKENDS:
        try:
            backends.get(name)
            status = "available"
            if name == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
                status += " for CUDA tensors (none here; CPU tensors need TRITON_INTERPRET=1)"
        except backends.BackendUnavailableError as exc:
            status = f"unavailable: {exc}"
        print(f"{name:7s} {status}")
    return 0


def _bench(argv: list[str]) -> int:
    from .eval import kernel_bench

    return kernel_bench.main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="epikern", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", add_help=False,
                   help="benchmark the uncertainty kernels on this machine (`epikern bench --help`)")
    sub.add_parser("backends", help="list the backends and why one is unavailable")
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":  # the benchmark parses its own options
        return _bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return _backends(args)


if __name__ == "__main__":
    sys.exit(main())
