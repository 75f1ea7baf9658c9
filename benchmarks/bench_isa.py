"""Side-by-side timing of the CPU kernels of two epikern checkouts (e.g. the ISA-dispatched module
against a ``-march=native`` build of main), interleaved, for a noisy shared machine.

One persistent worker process per build (``PYTHONPATH`` = that checkout, optionally with
``EPIKERN_CPU_ISA`` forced) times blocks of calls of the public ops on the same seeded inputs; the
parent asks the workers for one block each in turn, ``--rounds`` times, so that both see the same
load. Reported per case: each build's median seconds per call and the median, quartiles, min and
max of the per-round ratios against the first build.

    python benchmarks/bench_isa.py --build old=/tmp/isa_base --build new=. \\
        --build new-avx2=.:avx2 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# name: (op, K, N, V, dtype); K = 0 for forward_kl
CASES = {
    "du-rows-f32": ("draft_uncertainty", 4, 32, 32000, "float32"),
    "du-split-bf16": ("draft_uncertainty", 4, 2, 128256, "bfloat16"),
    "du-rows-bf16-K8": ("draft_uncertainty", 8, 8, 32000, "bfloat16"),
    "fkl-fwd-bwd-f32": ("forward_kl", 0, 32, 32000, "float32"),
    "fkl-fwd-bwd-bf16": ("forward_kl", 0, 32, 32000, "bfloat16"),
}


def _worker(threads: int, block_seconds: float) -> None:
    """Answer "case name" lines on stdin with {"isa": ..., "seconds": median per call}."""
    import torch

    import epikern as ek
    from epikern import _cpu

    torch.set_num_threads(threads)
    calls = {}
    for name, (op, K, N, V, dtype) in CASES.items():
        g = torch.Generator().manual_seed(0)
        dt = getattr(torch, dtype)
        if op == "draft_uncertainty":
            draft = (3 * torch.randn(K, N, V, generator=g)).to(dt)
            target = (3 * torch.randn(N, V, generator=g)).to(dt)
            calls[name] = lambda d=draft, t=target: ek.draft_uncertainty(d, t, backend="cpu")
        else:
            student = (3 * torch.randn(N, V, generator=g)).to(dt).requires_grad_()
            teacher = (3 * torch.randn(N, V, generator=g)).to(dt)
            calls[name] = lambda s=student, t=teacher: ek.forward_kl(s, t, backend="cpu").backward()
    print(json.dumps({"ready": _cpu.isa() if hasattr(_cpu, "isa") else "single"}), flush=True)
    for line in sys.stdin:
        fn = calls[line.strip()]
        fn()  # warm-up
        times = []
        start = time.perf_counter()
        while time.perf_counter() - start < block_seconds or len(times) < 3:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        print(json.dumps({"seconds": statistics.median(times), "calls": len(times)}), flush=True)


def _start(spec: str, threads: int, block_seconds: float) -> tuple[str, subprocess.Popen, str]:
    """``name=path[:isa]`` → (name, worker process, the ISA it runs)."""
    name, _, where = spec.partition("=")
    path, _, isa = where.partition(":")
    env = {**os.environ, "PYTHONPATH": str(Path(path).resolve())}
    env.pop("EPIKERN_CPU_ISA", None)
    if isa:
        env["EPIKERN_CPU_ISA"] = isa
    proc = subprocess.Popen([sys.executable, __file__, "--worker", "--threads", str(threads),
                             "--block-seconds", str(block_seconds)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    ready = json.loads(proc.stdout.readline())["ready"]
    return name, proc, ready


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="append", default=[],
                    help="name=checkout[:isa]; the first build is the baseline of the ratios")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--block-seconds", type=float, default=1.0)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--json", type=Path, help="write the raw per-round medians here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.threads, args.block_seconds)
        return 0
    if not args.build:
        ap.error("give at least one --build")
    workers = [_start(spec, args.threads, args.block_seconds) for spec in args.build]
    raw = {case: {name: [] for name, _, _ in workers} for case in args.cases}
    for r in range(args.rounds):
        for case in args.cases:
            order = workers if r % 2 == 0 else workers[::-1]  # alternate who goes first
            for name, proc, _ in order:
                proc.stdin.write(case + "\n")
                proc.stdin.flush()
                raw[case][name].append(json.loads(proc.stdout.readline())["seconds"])
    for _, proc, _ in workers:
        proc.stdin.close()
        proc.wait()
    base = workers[0][0]
    print(f"{args.rounds} interleaved rounds, {args.threads} thread(s), blocks of {args.block_seconds} s; "
          f"ratio = build / {base} per round")
    print(f"{'case':18s} {'build (ISA)':24s} {'median ms':>10s} {'ratio med':>10s} {'q1':>6s} {'q3':>6s} "
          f"{'min':>6s} {'max':>6s}")
    for case in args.cases:
        for name, _, isa in workers:
            t = raw[case][name]
            ratios = [a / b for a, b in zip(t, raw[case][base])]
            q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            print(f"{case:18s} {f'{name} ({isa})':24s} {1e3 * statistics.median(t):10.3f} "
                  f"{statistics.median(ratios):10.3f} {q1:6.3f} {q3:6.3f} {min(ratios):6.3f} {max(ratios):6.3f}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": raw, "isas": {n: i for n, _, i in workers}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
