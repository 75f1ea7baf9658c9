"""CPU benchmark of ``ek.draft_uncertainty`` (backend ``cpu``) against the eager PyTorch composite
and ``torch.compile`` of it (:mod:`epikern.eval.composite`), in one run on one machine (SPEC §7).

    epikern bench [--quick] [--json PATH]
    python benchmarks/bench_cpu_uncertainty.py [--quick] [--json PATH]   (the same)

Shapes: K=4, N=512, V=32000 with fp32 and bf16 logits, and K=4, N=128, V=128256 bf16 (fewer rows
to keep the eager composite's [K, N, V] float32 intermediates around 1-2 GB and the run within ~3
minutes on 2 cores), each with decompose=False and True. Reports median times (one warm-up call
each, then 3 rounds that run the kernel 3 times, eager once and compiled once, round-robin so that
load from other processes falls on all three alike), the effective bandwidth (logit bytes read once ÷ time) and the speed-up
of the kernel over eager and compiled PyTorch. The kernel's eu is checked against the composite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import epikern as ek
from epikern.eval.composite import composite

SHAPES = [  # (K, N, V, dtype)
    (4, 512, 32000, torch.float32),
    (4, 512, 32000, torch.bfloat16),
    (4, 128, 128256, torch.bfloat16),
]


def _round_robin_ms(fns: dict, rounds: int, per_round: dict) -> dict:
    """Median ms of each function, timed round-robin (every round runs each one ``per_round``
    times) after one warm-up call each, so that load from other processes falls on all alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round.get(name, 1)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _machine() -> dict:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_start": os.getloadavg()[0]}


def run(quick: bool = False) -> tuple[dict, list[dict]]:
    machine = _machine()
    rows = []
    gen = torch.Generator().manual_seed(0)
    shapes = SHAPES[:1] if quick else SHAPES
    for K, N, V, dtype in shapes:
        draft = (3 * torch.randn(K, N, V, generator=gen)).to(dtype)
        target = (3 * torch.randn(N, V, generator=gen)).to(dtype)
        weights = torch.full((K,), 1.0 / K)
        nbytes = (K + 1) * N * V * draft.element_size()
        compiled = torch.compile(composite, dynamic=False)
        for decompose in (False, True):
            kernel = lambda: ek.draft_uncertainty(draft, target, decompose=decompose, backend="cpu")  # noqa: E731
            eager = lambda: composite(draft, target, weights, 1.0, decompose)  # noqa: E731
            comp = lambda: compiled(draft, target, weights, 1.0, decompose)  # noqa: E731
            ref = eager()[0][0]
            assert torch.allclose(kernel().eu, ref, rtol=1e-3, atol=1e-3), "kernel disagrees with eager"
            t0 = time.perf_counter()
            comp()  # compile
            compile_s = time.perf_counter() - t0
            ms = _round_robin_ms({"kernel": kernel, "eager": eager, "compiled": comp},
                                 rounds=2 if quick else 3, per_round={"kernel": 3})
            t_kernel, t_eager, t_comp = ms["kernel"], ms["eager"], ms["compiled"]
            rows.append({
                "K": K, "N": N, "V": V, "dtype": str(dtype).removeprefix("torch."),
                "decompose": decompose, "kernel_ms": t_kernel, "eager_ms": t_eager,
                "compiled_ms": t_comp, "compile_s": compile_s,
                "kernel_GBps": nbytes / t_kernel / 1e6,
                "speedup_vs_eager": t_eager / t_kernel, "speedup_vs_compiled": t_comp / t_kernel,
            })
            print(_format_row(rows[-1]), flush=True)
    machine["loadavg_end"] = os.getloadavg()[0]
    return machine, rows


def _format_row(r: dict) -> str:
    return (f"| {r['K']}×{r['N']}×{r['V']} | {r['dtype']} | {r['decompose']} | {r['kernel_ms']:.1f} | "
            f"{r['kernel_GBps']:.2f} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | "
            f"{r['speedup_vs_eager']:.1f}× | {r['speedup_vs_compiled']:.1f}× |")


HEADER = ("| K×N×V | dtype | decompose | kernel ms | kernel GB/s | eager ms | compiled ms | "
          "vs eager | vs compiled |\n|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="epikern bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write machine info and rows as JSON")
    parser.add_argument("--quick", action="store_true", help="first shape only, fewer repeats")
    args = parser.parse_args(argv)
    print(HEADER, flush=True)
    machine, rows = run(args.quick)
    print()
    print(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), load average {machine['loadavg_start']:.2f} → "
          f"{machine['loadavg_end']:.2f}")
    print(HEADER)
    for r in rows:
        print(_format_row(r))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
