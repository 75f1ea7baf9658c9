"""forward + backward of the forward-KL distillation losses: epikern vs eager PyTorch vs torch.compile.

    python benchmarks/bench_forward_kl.py                    # CPU: N=4096, V=32000 fp32
    python benchmarks/bench_forward_kl.py --device cuda      # GPU: N=4096, V=128256 bf16 (gpu_check.sh)

Two problems, each timed as one forward + backward (median of ``--repeats`` after a warm-up; each
row is printed when it is measured, and ``--budget`` stops starting new ones):

* ``forward_kl``: student and teacher logits ``[N, V]``; the gradient w.r.t. the student.
  eager = ``kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True, "batchmean")`` in fp32.
* ``fused_linear``: ``hidden [N, d] @ W[V, d].T`` against teacher logits; gradients for hidden and
  W. eager = the matmul followed by the eager loss above (the ``[N, V]`` logits materialised).

Peak extra memory is what one forward + backward adds on top of the inputs, the gradients it
produces included (the student-logit gradient of ``forward_kl`` is ``N·V`` elements by
definition). CUDA: ``max_memory_allocated`` minus the allocation before the step. CPU: the peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after the warm-up) minus the
resident set before the step, with glibc told to serve every block ≥ 128 KiB by mmap so that freed
buffers leave the resident set. ``GB/s`` for ``forward_kl`` counts the bytes it must move (forward
reads s and t, backward reads s and t and writes the gradient) and is compared with a measured
device copy (read + write bytes ÷ time).
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import epikern as ek  # noqa: E402
from epikern.eval.report import write_json  # noqa: E402
from epikern.eval.timing import Case, median_time  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- baselines --------------------------------------------------------------------------------------

def eager_forward_kl(student, teacher, temperature: float):
    """The unfused composite: every ``[N, V]`` intermediate materialised in fp32."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def eager_fused_linear(hidden, weight, teacher, temperature: float):
    return eager_forward_kl(hidden @ weight.t(), teacher, temperature)


# --- measurement ------------------------------------------------------------------------------------

class _Memory:
    """Peak-memory probes of one device (the timing is :mod:`epikern.eval.timing`'s)."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = device == "cuda"
        if not self.cuda and sys.platform.startswith("linux"):
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, freed blocks go back to the OS

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return 1024 * next(int(line.split()[1]) for line in f if line.startswith(key))

    def reset(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self._status("VmRSS")

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else self._status("VmHWM")


def _measure(memory: _Memory, step: Callable[[], None], clear: Callable[[], None], repeats: int):
    """(median seconds, peak extra bytes) of ``step`` (one forward + backward; ``clear`` drops its
    gradients, untimed, after each call)."""
    step()  # warm-up: compilation, thread pools, lazily loaded libraries
    clear()
    base = memory.reset()
    seconds = median_time(Case(step, reset=clear), repeats, warmup=0, device=memory.device)
    return seconds, memory.peak() - base


def _copy_bandwidth(device: str, nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_time(lambda: dst.copy_(src), 5, warmup=1, device=device)


def _loss_step(loss_fn, inputs):
    def step():
        loss_fn(*inputs).backward()

    def clear():
        for x in inputs:
            x.grad = None

    return step, clear


# --- problems ---------------------------------------------------------------------------------------

class _Report:
    """Prints each result row as soon as it exists (a time-boxed caller keeps what finished)."""

    def __init__(self, copy_gb_s: float, budget_s: float):
        self.copy_gb_s, self.rows, self.eager = copy_gb_s, [], {}
        self.deadline = time.perf_counter() + budget_s
        print("| problem | method | fwd+bwd ms | vs eager | peak extra MiB | GB/s (of copy) |")
        print("|---|---|---:|---:|---:|---:|", flush=True)

    def out_of_time(self, problem: str, method: str) -> bool:
        if time.perf_counter() < self.deadline:
            return False
        print(f"| {problem} | {method} | skipped: time budget spent | | | |", flush=True)
        return True

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if row["method"] == "eager":
            self.eager[row["problem"]] = row["ms"]
        base = self.eager.get(row["problem"])
        ratio = f"{base / row['ms']:.2f}×" if base else "–"
        bw = (f"{row['gb_s']:.1f} ({100 * row['gb_s'] / self.copy_gb_s:.0f}%)"
              if "gb_s" in row else "–")
        print(f"| {row['problem']} | {row['method']} | {row['ms']:.1f} | {ratio} | "
              f"{row['peak_extra_mib']:.0f} | {bw} |", flush=True)


def bench_forward_kl(memory, args, methods, report: _Report):
    dtype = DTYPES[args.dtype]
    g = torch.Generator(device=args.device).manual_seed(0)
    student = torch.randn(args.n, args.v, device=args.device, generator=g).mul_(2).to(dtype)
    teacher = torch.randn(args.n, args.v, device=args.device, generator=g).mul_(2).to(dtype)
    s = student.requires_grad_()
    el = student.element_size()
    moved = args.n * args.v * (2 * el + 2 * teacher.element_size() + el)
    for name, fn in methods.items():
        if report.out_of_time("forward_kl", name):
            continue
        step, clear = _loss_step(lambda s: fn(s, teacher, args.temperature), [s])
        sec, extra = _measure(memory, step, clear, args.repeats)
        report.add({"problem": "forward_kl", "method": name, "ms": 1e3 * sec,
                    "peak_extra_mib": extra / 2**20, "gb_s": moved / sec / 1e9})


def bench_fused_linear(memory, args, methods, report: _Report):
    dtype = DTYPES[args.dtype]
    g = torch.Generator(device=args.device).manual_seed(1)
    n = args.fused_n
    hidden = torch.randn(n, args.d, device=args.device, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(args.v, args.d, device=args.device, generator=g) / args.d ** 0.5).to(
        dtype).requires_grad_()
    teacher = torch.randn(n, args.v, device=args.device, generator=g).mul_(2).to(dtype)
    for name, fn in methods.items():
        if report.out_of_time("fused_linear", name):
            continue
        step, clear = _loss_step(lambda h, w: fn(h, w, teacher, args.temperature),
                                 [hidden, weight])
        sec, extra = _measure(memory, step, clear, args.repeats)
        report.add({"problem": "fused_linear", "method": name, "ms": 1e3 * sec,
                    "peak_extra_mib": extra / 2**20})


def _methods(args):
    kl = {"eager": eager_forward_kl,
          "epikern": lambda s, t, T: ek.forward_kl(s, t, temperature=T)}
    fused = {"eager": eager_fused_linear,
             "epikern": lambda h, w, t, T: ek.fused_linear_forward_kl(h, w, t, temperature=T)}
    if not args.no_compile:
        kl["torch.compile"] = torch.compile(eager_forward_kl, dynamic=False)
        fused["torch.compile"] = torch.compile(eager_fused_linear, dynamic=False)
    return kl, fused


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--n", type=int, default=4096, help="rows of the forward_kl problem")
    p.add_argument("--v", type=int, default=None, help="vocabulary (default 32000 cpu, 128256 cuda)")
    p.add_argument("--d", type=int, default=None, help="hidden size (default 256 cpu, 4096 cuda)")
    p.add_argument("--fused-n", type=int, default=None,
                   help="rows of the fused-linear problem (default 2048 cpu, 8192 cuda)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="logit / weight dtype (default float32 cpu, bfloat16 cuda)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 3 cpu, 20 cuda)")
    p.add_argument("--only", choices=["forward_kl", "fused_linear"], default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which no further method starts (default: none on cpu, "
                        "60 on cuda, for the 120 s box bench_gpu.py gives this script)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU")
    args.v = args.v or (128256 if cuda else 32000)
    args.d = args.d or (4096 if cuda else 256)
    args.fused_n = args.fused_n or (8192 if cuda else 2048)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats or (10 if cuda else 3)
    args.budget = args.budget if args.budget is not None else (60.0 if cuda else float("inf"))

    memory = _Memory(args.device)
    kl, fused = _methods(args)
    copy_gb_s = _copy_bandwidth(args.device, 1 << 30 if cuda else 1 << 28) / 1e9
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    header = (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · {args.device} ({device_name}, "
              f"{torch.get_num_threads()} threads) · torch {torch.__version__} · "
              f"forward_kl N={args.n}, fused_linear N={args.fused_n}, d={args.d} · V={args.v} "
              f"{args.dtype} · T={args.temperature} · median of {args.repeats} · copy "
              f"{copy_gb_s:.1f} GB/s")
    print(header, flush=True)
    report = _Report(copy_gb_s, args.budget)
    # the compiled baselines last: under a time budget their compilation is what gets skipped
    for phase in (("eager", "epikern"), ("torch.compile",)):
        if args.only in (None, "forward_kl"):
            bench_forward_kl(memory, args, {k: v for k, v in kl.items() if k in phase}, report)
        if args.only in (None, "fused_linear"):
            bench_fused_linear(memory, args, {k: v for k, v in fused.items() if k in phase}, report)
    if args.json:
        write_json(args.json, {"header": header, "copy_gb_s": copy_gb_s,
                               "args": {k: str(v) for k, v in vars(args).items()}, "rows": report.rows})

if __name__ == "__main__":
    main()
