"""The ``epikern`` command.

    epikern bench [--quick] [--out DIR] [--target ... --drafts ...]
                              the paper's comparison end to end: trains (once, cached) the tiny target,
                              DDD/IDD drafts and the OSD proxy, answers held-out problems, and compares
                              every estimator with TokUR on FLOPs, latency and quality (report + plots)
    epikern bench kernels     the CPU kernel benchmark of draft_uncertainty vs eager and compiled PyTorch
    epikern bench speculative speculative decoding with EU vs plain target decoding (tokens/s, acceptance)
    epikern bench sweep [--quick]
                              drafts over capacity x diversity x the variants beyond the paper, scored
                              against the ground truth (cached; sweep.json, sweep.md, plots)
    epikern train target|drafts|proxy ...
                              train the tiny target, DDD/IDD drafts or the OSD proxy (`epikern train -h`)
    epikern backends          which backends can run here, and why not
"""

from __future__ import annotations

import argparse
import sys

from .extras import MissingExtraError, install_command, require

BENCHES = ("kernels", "speculative", "sweep")


def _backends(_args: argparse.Namespace) -> int:
    import os

    import torch

    from . import backends
    from .backends import cpu

    for name in backends.BACKENDS:
        try:
            backends.get(name)
            status = "available"
            if name == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
                status += " for CUDA tensors (none here; CPU tensors need TRITON_INTERPRET=1)"
            if name == "cpu":
                status += f", {cpu.isa_summary()}"
        except backends.BackendUnavailableError as exc:
            status = f"unavailable: {exc}"
        print(f"{name:7s} {status}")
    return 0


def _bench(argv: list[str]) -> int:
    """``epikern bench [kernels|speculative|sweep] ...``: each benchmark parses its own options."""
    if argv and argv[0] == "sweep":
        from .eval import sweep

        return sweep.main(argv[1:])
    if argv and argv[0] == "kernels":
        from .eval import kernel_bench

        return kernel_bench.main(argv[1:])
    if argv and argv[0] == "speculative":
        from .eval import speculative_bench

        return speculative_bench.main(argv[1:])
    from .eval import bench

    return bench.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _run(argv)
    except MissingExtraError as exc:  # a command that needs an extra on a core install
        print(f"epikern: {exc}", file=sys.stderr)
        return 2


def _run(argv: list[str]) -> int:
    try:
        from .training import cli as train_cli
    except MissingExtraError:  # `epikern backends` still works; `epikern train` says what to install
        train_cli = None

    parser = argparse.ArgumentParser(prog="epikern", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", add_help=False,
                   help="the end-to-end comparison; `bench kernels`, `bench speculative`, `bench sweep` "
                        "(`epikern bench --help`)")
    sub.add_parser("backends", help="list the backends and why one is unavailable")
    if argv[:1] == ["bench"]:  # the benchmarks parse their own options
        return _bench(argv[1:])
    if train_cli is None:
        sub.add_parser("train", add_help=False, help=f"train models (needs: {install_command('train')})")
        if argv[:1] == ["train"]:
            require("train", "epikern train")
    else:
        train_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "train":
        return train_cli.main(args)
    return _backends(args)


if __name__ == "__main__":
    sys.exit(main())
