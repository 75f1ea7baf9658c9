"""CPU benchmark of ``ek.draft_uncertainty`` (backend ``cpu``) against PyTorch composites, in one run
on one machine (design §7).

    epikern bench kernels [--quick] [--json PATH]
    python benchmarks/bench_cpu_uncertainty.py [--quick] [--json PATH]   (the same)

Shapes: K=4, N=512, V=32000 with fp32 and bf16 logits, and K=4, N=128, V=128256 bf16 (fewer rows
to keep the composites' [K, N, V] float32 intermediates around 1-2 GB), each with
decompose=False and True. Contestants (:mod:`epikern.eval.composite`), each eagerly and under
``torch.compile(dynamic=False)``:

* the *full* composite: all six statistics, as the kernel returns them;
* the *lean* composite: only the outputs asked for, the way a user writes them (jsd + kl with
  the split: log_softmax per draft, logsumexp over drafts for the mixture, two sums; eu without).
  design §7's CPU target is stated against this one.

Times are medians (:mod:`epikern.eval.timing`: one warm-up call each, then rounds that run the
kernel 3 times and every composite once, round-robin, so that load from other processes falls on
all of them alike); the 1-minute load average is printed with every row. Columns:

* ``GB/s``: logit bytes read once ÷ kernel time;
* ``cyc/logit``: kernel time × threads × clock ÷ ((K + 1)·N·V) (wall clock, so it includes time
  the threads lose to other processes); the clock is calibrated with a timed chain of dependent
  integer adds (``/proc/cpuinfo`` "cpu MHz" is printed next to it);
* ``1-core cyc/logit``: the same from the kernel's thread CPU time on one thread (best of 3),
  which time spent descheduled does not inflate;
* ``exp/entry``, ``log/entry``: the transcendental work the kernel reports per vocabulary entry;
* ``× floor``: that one-thread CPU time ÷ the transcendental floor N·V·((K + 1)·t_exp + t_log)
  (t_log only with the split), with t_exp and t_log the measured cost per element of the
  kernel's own vectorised exp2 and log2 on one core with the data in L1 — what any exact method
  needs (K + 1 exponentials per entry for the softmaxes, one logarithm for log q̄).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import epikern as ek
from epikern.backends import cpu
from epikern.eval.composite import composite, lean_composite
from epikern.eval.machine import machine_info
from epikern.eval.report import write_json
from epikern.eval.timing import Case, interleaved_medians, timed_call

SHAPES = [  # (K, N, V, dtype)
    (4, 512, 32000, torch.float32),
    (4, 512, 32000, torch.bfloat16),
    (4, 128, 128256, torch.bfloat16),
]
CONTESTANTS = ("kernel", "eager", "compiled", "lean_eager", "lean_compiled")


def _one_thread(draft, target, weights, decompose, trials: int = 3) -> tuple[float, cpu.KernelWork]:
    """Best thread CPU time (s) of the raw kernel on the calling thread, and its work counters."""
    K, N, _ = draft.shape
    outs = (torch.empty(6, N), torch.empty(K, N), torch.empty(N))
    best = float("inf")
    for _ in range(trials):
        t0 = time.thread_time()
        work = cpu.draft_uncertainty_raw(draft, target, weights, 1.0, decompose, *outs, num_threads=1)
        best = min(best, time.thread_time() - t0)
    return best, work


def run(quick: bool = False) -> tuple[dict, list[dict]]:
    machine = {**machine_info(), **cpu.calibration()}
    threads = machine["torch_threads"]
    rows = []
    gen = torch.Generator().manual_seed(0)
    shapes = SHAPES[:1] if quick else SHAPES
    for K, N, V, dtype in shapes:
        draft = (3 * torch.randn(K, N, V, generator=gen)).to(dtype)
        target = (3 * torch.randn(N, V, generator=gen)).to(dtype)
        weights = torch.full((K,), 1.0 / K)
        nbytes = (K + 1) * N * V * draft.element_size()
        compiled = torch.compile(composite, dynamic=False)
        lean_compiled = torch.compile(lean_composite, dynamic=False)
        for decompose in (False, True):
            fns = {
                "kernel": lambda: ek.draft_uncertainty(draft, target, decompose=decompose, backend="cpu"),
                "eager": lambda: composite(draft, target, weights, 1.0, decompose),
                "compiled": lambda: compiled(draft, target, weights, 1.0, decompose),
                "lean_eager": lambda: lean_composite(draft, target, weights, 1.0, decompose),
                "lean_compiled": lambda: lean_compiled(draft, target, weights, 1.0, decompose),
            }
            out = fns["kernel"]()
            assert torch.allclose(out.eu, fns["eager"]()[0][0], rtol=1e-3, atol=1e-3), "kernel eu != eager"
            lean = fns["lean_eager"]()
            mine = (out.jsd, out.kl) if decompose else (out.eu,)
            assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in zip(mine, lean)), \
                "kernel != lean composite"
            compile_s = {}
            for name in ("compiled", "lean_compiled"):
                compile_s[name] = timed_call(fns[name])[1]
            seconds = interleaved_medians({**fns, "kernel": Case(fns["kernel"], calls_per_round=3)},
                                          rounds=2 if quick else 3)
            ms = {name: 1e3 * s for name, s in seconds.items()}
            cpu_s, work = _one_thread(draft, target, weights, decompose)
            entries = N * V
            floor_s = entries * ((K + 1) * machine["exp_ns"] + (machine["log_ns"] if decompose else 0.0)) * 1e-9
            t = ms["kernel"] * 1e-3
            rows.append({
                "K": K, "N": N, "V": V, "dtype": str(dtype).removeprefix("torch."),
                "decompose": decompose, **{f"{n}_ms": ms[n] for n in CONTESTANTS},
                "compile_s": compile_s["compiled"], "lean_compile_s": compile_s["lean_compiled"],
                "kernel_GBps": nbytes / t / 1e9,
                "cycles_per_logit": t * threads * machine["clock_hz"] / ((K + 1) * entries),
                "one_core_ms": cpu_s * 1e3,
                "one_core_cycles_per_logit": cpu_s * machine["clock_hz"] / ((K + 1) * entries),
                "exps_per_entry": work.exps / entries, "logs_per_entry": work.logs / entries,
                "floor_one_core_ms": floor_s * 1e3, "x_floor": cpu_s / floor_s,
                **{f"speedup_vs_{n}": ms[n] / ms["kernel"] for n in CONTESTANTS[1:]},
                "loadavg": os.getloadavg()[0],
            })
            print(_format_row(rows[-1]), flush=True)
    machine["loadavg_end"] = os.getloadavg()[0]
    return machine, rows


def _format_row(r: dict) -> str:
    return (f"| {r['K']}×{r['N']}×{r['V']} | {r['dtype']} | {r['decompose']} | {r['kernel_ms']:.1f} | "
            f"{r['kernel_GBps']:.2f} | {r['cycles_per_logit']:.2f} | {r['one_core_cycles_per_logit']:.2f} | "
            f"{r['exps_per_entry']:.2f} / {r['logs_per_entry']:.2f} | {r['one_core_ms']:.1f} | "
            f"{r['floor_one_core_ms']:.1f} | {r['x_floor']:.2f}× | "
            f"{r['eager_ms']:.0f} | {r['compiled_ms']:.0f} | {r['lean_eager_ms']:.0f} | "
            f"{r['lean_compiled_ms']:.0f} | {r['speedup_vs_eager']:.1f}× | {r['speedup_vs_compiled']:.1f}× | "
            f"{r['speedup_vs_lean_eager']:.1f}× | **{r['speedup_vs_lean_compiled']:.1f}×** | "
            f"{r['loadavg']:.1f} |")


HEADER = ("| K×N×V | dtype | decompose | kernel ms | GB/s | cyc/logit | 1-core cyc/logit | "
          "exp / log per entry | 1-core ms | floor 1-core ms | × floor | eager ms | compiled ms | "
          "lean eager ms | lean compiled ms | vs eager | vs compiled | vs lean eager | "
          "vs lean compiled | load |\n" + "|---" * 20 + "|")


def _describe(machine: dict) -> str:
    mhz = machine["cpuinfo_mhz"]
    return (f"{machine['cpu']}, {machine['cores']} cores, {machine['simd_lanes']} float lanes, clock "
            f"{machine['clock_hz'] / 1e9:.2f} GHz (dependent-add chain; /proc/cpuinfo says "
            f"{'?' if mhz is None else f'{mhz:.0f}'} MHz); exp2 {machine['exp_ns']:.3f} ns, "
            f"log2 {machine['log_ns']:.3f} ns per element (one core, L1); torch {machine['torch']} "
            f"({machine['torch_threads']} threads); load average {machine['loadavg_start']:.2f} → "
            f"{machine['loadavg_end']:.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="epikern bench kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write machine info and rows as JSON")
    parser.add_argument("--quick", action="store_true", help="first shape only, fewer repeats")
    args = parser.parse_args(argv)
    print(HEADER, flush=True)  # each row is printed as soon as it is measured
    machine, rows = run(args.quick)
    print()
    print(_describe(machine))
    if args.json:
        write_json(args.json, {"machine": machine, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
