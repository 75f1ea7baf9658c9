"""GPU benchmarks of ``draft_uncertainty`` (design §7), run by ``benchmarks/gpu_check.sh``.

For the prefill shape (K=4, N=4096, V=128256, bf16) and decode shapes (N ∈ {1, 8, 64}) it times
every available GPU backend (``cuda`` when ``epikern._cuda`` imports, ``triton``) through its
out-variant entry point, with and without the mixture sweep, against the eager PyTorch composite
and ``torch.compile`` of it (:mod:`epikern.eval.composite`); Liger-Kernel's JSD (K=2, weights β, 1−β) when
importable; and ``benchmarks/bench_forward_kl.py --device cuda`` when that script exists.

Times are medians of CUDA-event measurements with L2 flushed before each run
(:mod:`epikern.eval.timing`). Effective bandwidth
is the logit bytes read once ÷ time, compared with a device-to-device copy measured here
((read + write) bytes ÷ time). Decode is compared with one empty launch plus one read of the bytes.
Missing pieces are reported, never downloaded. ``--device cpu --tiny`` runs the same logic on tiny
shapes with the CPU backends (to test the script without a GPU). The Markdown table comes last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import epikern as ek  # noqa: E402
from epikern import backends  # noqa: E402
from epikern.backends.reference import STATS  # noqa: E402
from epikern.eval.composite import compiled_composite, composite  # noqa: E402
from epikern.eval.report import write_json  # noqa: E402
from epikern.eval.timing import median_time  # noqa: E402


@dataclass
class Shape:
    name: str
    K: int
    N: int
    V: int
    dtype: torch.dtype

    def logit_bytes(self, with_target: bool = True) -> int:
        rows = self.K * self.N + (self.N if with_target else 0)
        return rows * self.V * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Row:
    shape: str
    impl: str
    ms: Optional[float] = None
    gbps: Optional[float] = None
    note: str = ""
    extra: dict = field(default_factory=dict)


Timer = Callable[..., float]  # (fn, reps=20) -> median ms


def make_timer(device: torch.device) -> Timer:
    """Median ms of a callable over ``reps`` calls after 3 warm-up calls (:mod:`epikern.eval.timing`:
    CUDA events with L2 flushed before each call, at most ~10 s of calls once 3 are done)."""
    def timer(fn: Callable[[], object], reps: int = 20) -> float:
        return 1e3 * median_time(fn, reps, warmup=3, device=device, flush_l2=True, max_seconds=10.0)
    return timer


def copy_gbps(timer: Timer, device: torch.device, nbytes: int) -> float:
    """Device-to-device copy bandwidth, (read + write) bytes ÷ time, in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), reps=10)
    return 2 * nbytes / ms / 1e6


def empty_launch_ms(timer: Timer, device: torch.device) -> float:
    """Time of one launch that does nothing measurable (a one-element fill)."""
    x = torch.empty(1, device=device)
    return timer(lambda: x.zero_(), reps=50)


def make_inputs(shape: Shape, device: torch.device, K: Optional[int] = None):
    g = torch.Generator(device=device).manual_seed(0)
    K = shape.K if K is None else K
    draft = torch.randn((K, shape.N, shape.V), generator=g, device=device, dtype=torch.float32)
    target = torch.randn((shape.N, shape.V), generator=g, device=device, dtype=torch.float32)
    return draft.mul_(3).to(shape.dtype), target.mul_(3).to(shape.dtype)


def entry_call(name: str, draft, target, weights, decompose: bool) -> Callable[[], None]:
    """The backend's out-variant with preallocated outputs (the kernel, no op-layer overhead)."""
    K, N, _ = draft.shape
    fn = backends.entry("draft_uncertainty", name)
    stats = torch.empty((len(STATS), N), dtype=torch.float32, device=draft.device)
    dlse = torch.empty((K, N), dtype=torch.float32, device=draft.device)
    tlse = torch.empty((N,), dtype=torch.float32, device=draft.device)
    return lambda: fn(draft, target, weights, 1.0, decompose, stats, dlse, tlse)


def kernel_backends(device: torch.device) -> tuple[list[str], list[str]]:
    """(available, missing-with-reason) backends for ``device``."""
    names = ("cuda", "triton") if device.type == "cuda" else ("cpu", "torch")
    ok, missing = [], []
    for name in names:
        try:
            backends.get(name)
            ok.append(name)
        except backends.BackendUnavailableError as exc:
            missing.append(f"{name}: {exc}")
    return ok, missing


def bench_impls(shape: Shape, inputs, timer: Timer, impls: list[tuple[str, Callable, int]],
                deadline: float) -> list[Row]:
    """Time each ``(name, make_fn(draft, target, weights), reps)`` on ``shape``; failures, OOM and
    a spent time budget become notes."""
    draft, target, weights = inputs
    rows = []
    for impl, make_fn, reps in impls:
        if time.perf_counter() > deadline:
            rows.append(Row(shape.name, impl, note="skipped: time budget spent"))
            continue
        try:
            ms = timer(make_fn(draft, target, weights), reps=reps)
        except torch.OutOfMemoryError:
            rows.append(Row(shape.name, impl, note="out of memory"))
            torch.cuda.empty_cache()
            continue
        except Exception as exc:  # a missing or failing piece is reported, not fatal
            rows.append(Row(shape.name, impl, note=f"failed: {type(exc).__name__}: {exc}"[:200]))
            continue
        rows.append(Row(shape.name, impl, ms, shape.logit_bytes() / ms / 1e6))
    return rows


def bench_shapes(shapes: list[Shape], device, timer: Timer, kernel_names: list[str],
                 copy_bw: float, launch_ms: float, compiled: Optional[Callable],
                 deadline: float) -> list[Row]:
    """Kernels on every shape first, then the eager and the compiled composite (so that a slow
    compile or a spent budget never costs the kernel numbers); rows grouped by shape."""
    inputs = {}
    for shape in shapes:
        draft, target = make_inputs(shape, device)
        weights = torch.full((shape.K,), 1.0 / shape.K, dtype=torch.float32, device=device)
        inputs[shape.name] = (draft, target, weights)
    kernels = []
    for name in kernel_names:
        kernels.append((name, lambda d, t, w, name=name: entry_call(name, d, t, w, True), 20))
        kernels.append((f"{name} (eu only)",
                        lambda d, t, w, name=name: entry_call(name, d, t, w, False), 20))
    groups = [kernels, [("eager composite", lambda d, t, w: lambda: composite(d, t, w), 5)]]
    if compiled is not None:
        groups.append([("torch.compile composite", lambda d, t, w: lambda: compiled(d, t, w), 10)])
    by_shape = {shape.name: [] for shape in shapes}
    for impls in groups:
        for shape in shapes:
            new = bench_impls(shape, inputs[shape.name], timer, impls, deadline)
            by_shape[shape.name] += new
            print(markdown(new), flush=True)
    rows = []
    for shape in shapes:
        nbytes = shape.logit_bytes()
        for row in by_shape[shape.name]:
            if row.ms is not None:
                row.extra["pct_copy"] = 100 * row.gbps / copy_bw
                if shape.N <= 64:
                    row.extra["x_launch_plus_read"] = row.ms / (launch_ms + nbytes / copy_bw / 1e6)
        _ratios(by_shape[shape.name])
        rows += by_shape[shape.name]
    return rows


def _ratios(rows: list[Row]) -> None:
    ref = {r.impl: r.ms for r in rows if r.ms is not None}
    for row in rows:
        if row.ms is None:
            continue
        for base, key in (("eager composite", "x_vs_eager"), ("torch.compile composite", "x_vs_compile")):
            if base in ref and row.impl != base:
                row.extra[key] = ref[base] / row.ms


def bench_liger(shape: Shape, device, timer: Timer, kernel_names: list[str], beta: float,
                deadline: float) -> list[Row]:
    """K=2 generalized JSD with weights (β, 1−β): ours from logits vs Liger from log-probs."""
    name = f"{shape.name} K=2 jsd"
    try:
        from liger_kernel.transformers.functional import liger_jsd
    except Exception as exc:  # not installed (or its import fails): report and go on
        return [Row(name, "liger jsd", note=f"liger-kernel not importable: {exc}"[:200])]
    if device.type != "cuda":
        return [Row(name, "liger jsd", note="liger-kernel needs CUDA")]
    if time.perf_counter() > deadline:
        return [Row(name, "liger jsd", note="skipped: time budget spent")]
    draft, _ = make_inputs(shape, device, K=2)
    w = torch.tensor([beta, 1 - beta], dtype=torch.float32, device=device)
    log_p = torch.log_softmax(draft[0].float(), -1).to(shape.dtype)  # teacher (weight β)
    log_q = torch.log_softmax(draft[1].float(), -1).to(shape.dtype)  # student (weight 1−β)
    nbytes = 2 * shape.N * shape.V * draft.element_size()
    rows = []
    liger = liger_jsd(log_q, log_p, beta=beta)
    ours = ek.draft_uncertainty(draft, None, weights=w, backend=kernel_names[0]).jsd.mean()
    agree = abs(float(liger) - float(ours)) <= 2e-2 * max(1.0, abs(float(ours)))
    ms = timer(lambda: liger_jsd(log_q, log_p, beta=beta))
    rows.append(Row(name, "liger jsd (from log-probs)", ms, nbytes / ms / 1e6,
                    note=f"value {float(liger):.5f} vs ours {float(ours):.5f}"
                         + ("" if agree else " DISAGREE")))
    for kname in kernel_names:
        ms = timer(entry_call(kname, draft, None, w, True))
        rows.append(Row(name, kname, ms, nbytes / ms / 1e6))
    for row in rows[1:]:
        row.extra["x_vs_liger"] = rows[0].ms / row.ms
    return rows


def run_forward_kl(device: torch.device, timeout: float) -> list[str]:
    script = os.path.join(HERE, "bench_forward_kl.py")
    if not os.path.exists(script):
        return ["forward_kl: benchmarks/bench_forward_kl.py does not exist (skipped)"]
    # its own --budget (at most its 60 s cuda default) must end before our timeout, which kills
    # it; and the rows it printed before a kill are kept
    budget = max(5.0, min(60.0, timeout - 30.0))
    try:
        proc = subprocess.run([sys.executable, script, "--device", device.type,
                               "--budget", f"{budget:.0f}"],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        return [f"forward_kl: timed out after {timeout:.0f} s"] + out.strip().splitlines()[-25:]
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return [f"forward_kl (rc={proc.returncode}):"] + lines[-25:]


def _fmt(x: Optional[float], spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown(rows: list[Row]) -> str:
    out = ["| shape | impl | ms | GB/s | % copy | × eager | × compile | × liger | note |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r.extra
        out.append(f"| {r.shape} | {r.impl} | {_fmt(r.ms, '.4f')} | {_fmt(r.gbps, '.1f')} "
                   f"| {_fmt(e.get('pct_copy'), '.0f')} | {_fmt(e.get('x_vs_eager'), '.1f')} "
                   f"| {_fmt(e.get('x_vs_compile'), '.1f')} | {_fmt(e.get('x_vs_liger'), '.1f')} "
                   f"| {r.note} |")
    return "\n".join(out)


def targets(rows: list[Row], launch_ms: float, kernel_names: list[str]) -> list[str]:
    """design §7 verdicts for the kernels that ran."""
    lines = []
    for r in rows:
        base = r.impl.split(" ")[0]
        if base not in kernel_names or r.ms is None or "liger" in r.impl:
            continue
        e = r.extra
        if r.shape.startswith("prefill") and "K=2" not in r.shape:
            lines.append(f"{r.shape} {r.impl}: {e['pct_copy']:.0f}% of copy bandwidth "
                         f"(target ≥ 80%) {'OK' if e['pct_copy'] >= 80 else 'MISSED'}")
            if "x_vs_compile" in e:
                lines.append(f"{r.shape} {r.impl}: {e['x_vs_compile']:.1f}× torch.compile "
                             f"(target ≥ 2×) {'OK' if e['x_vs_compile'] >= 2 else 'MISSED'}")
        if "x_launch_plus_read" in e:
            x = e["x_launch_plus_read"]
            lines.append(f"{r.shape} {r.impl}: {x:.2f}× (empty launch {launch_ms * 1e3:.1f} µs + one "
                         f"read) (target ≤ 2×) {'OK' if x <= 2 else 'MISSED'}")
        if "x_vs_liger" in e:
            lines.append(f"{r.shape} {r.impl}: {e['x_vs_liger']:.1f}× Liger JSD (target ≥ 5×) "
                         f"{'OK' if e['x_vs_liger'] >= 5 else 'MISSED'}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="GPU draft_uncertainty benchmarks (design §7)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (tests the script)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--budget", type=float, default=360.0, help="seconds for the benchmarks")
    parser.add_argument("--json", help="write every number to this JSON file")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark (use --device cpu --tiny to test the script)")
        return 2
    device = torch.device(args.device)
    deadline = time.perf_counter() + args.budget
    if args.tiny:
        dt = torch.float32
        shapes = [Shape("prefill K=4 N=64 V=1000 fp32", 4, 64, 1000, dt)]
        shapes += [Shape(f"decode K=4 N={n} V=1000 fp32", 4, n, 1000, dt) for n in (1, 8)]
        liger_shape = Shape("prefill N=64 V=1000 fp32", 2, 64, 1000, dt)
        copy_bytes = 16 << 20
    else:
        dt = torch.bfloat16
        shapes = [Shape("prefill K=4 N=4096 V=128256 bf16", 4, 4096, 128256, dt)]
        shapes += [Shape(f"decode K=4 N={n} V=128256 bf16", 4, n, 128256, dt) for n in (1, 8, 64)]
        liger_shape = Shape("prefill N=4096 V=128256 bf16", 2, 4096, 128256, dt)
        copy_bytes = 2 << 30

    timer = make_timer(device)
    kernel_names, missing = kernel_backends(device)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger_kernel"),
        "backends": kernel_names,
        "missing_backends": missing,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    copy_bw = copy_gbps(timer, device, copy_bytes)
    launch_ms = empty_launch_ms(timer, device)
    info.update(copy_gbps=copy_bw, empty_launch_us=launch_ms * 1e3)
    print(json.dumps(info, indent=1), flush=True)

    rows: list[Row] = []
    compiled = None if args.no_compile else compiled_composite()
    rows += bench_shapes(shapes, device, timer, kernel_names, copy_bw, launch_ms, compiled,
                         deadline)
    if kernel_names:
        try:
            rows += bench_liger(liger_shape, device, timer, kernel_names, 0.5, deadline)
        except Exception as exc:  # liger-kernel imports but fails (its triton, OOM): go on
            rows.append(Row(f"{liger_shape.name} K=2 jsd", "liger jsd",
                            note=f"failed: {type(exc).__name__}: {exc}"[:200]))
    fkl = run_forward_kl(device, timeout=max(10.0, min(120.0, deadline - time.perf_counter())))
    verdicts = targets(rows, launch_ms, kernel_names)

    if args.json:
        write_json(args.json, {"info": info, "rows": [asdict(r) for r in rows], "forward_kl": fkl,
                               "targets": verdicts})
    print("\n".join(fkl))
    print("\n## draft_uncertainty on " + info["device"])
    print(f"copy {copy_bw:.0f} GB/s, empty launch {launch_ms * 1e3:.1f} µs, torch {info['torch']}, "
          f"triton {info['triton']}; backends {kernel_names}; missing: {missing or 'none'}\n")
    print("\n".join(verdicts))
    print()
    print(markdown(rows))
    return 0


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as exc:
        return f"not importable ({type(exc).__name__})"
    return getattr(mod, "__version__", "?")


if __name__ == "__main__":
    sys.exit(main())
