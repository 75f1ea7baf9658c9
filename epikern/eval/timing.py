"""The one timing harness of epikern's benchmarks (``epikern bench`` and ``benchmarks/*.py``).

Every timing is a **median over interleaved rounds**: each round runs every case once (or
``calls_per_round`` times) in turn, so that load from other processes on a shared machine falls on
all of them alike and their ratios stay meaningful when the absolute times do not. One warm-up call
of each case comes first (compilation, lazily loaded libraries, caches).

A single call is timed by :func:`timed_call`:

* CPU: ``time.perf_counter`` around the call (wall time);
* CUDA: a pair of ``torch.cuda.Event`` on the current stream around the call, read after waiting for
  the end event (the device time of the queued work, launch gaps included). With ``flush_l2`` a
  256 MiB buffer is zeroed before each call, so no call finds its inputs in L2 from the previous one
  (the convention of FlashInfer's ``bench_gpu_time`` and Triton's ``do_bench``).
"""

from __future__ import annotations

from ..extras import require

require("eval", __name__)

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Optional, TypeVar, Union

import torch
from tqdm.auto import tqdm

__all__ = ["Case", "Clock", "timed_call", "interleaved_medians", "median_time", "resolve_device"]

K = TypeVar("K", bound=Hashable)
#: Bytes zeroed before each CUDA call with ``flush_l2`` (larger than any GPU's L2 today).
L2_FLUSH_BYTES = 256 << 20


@dataclass(frozen=True)
class Case:
    """One thing to time.

    Attributes:
        fn: the call to time.
        calls_per_round: how many timed calls it gets in each round (a cheap case may get more, so
            that its median rests on more samples).
        reset: untimed, after every call of ``fn`` (e.g. drop the gradients a backward produced).
    """

    fn: Callable[[], Any]
    calls_per_round: int = 1
    reset: Optional[Callable[[], None]] = None

    def __post_init__(self):
        _check_int("calls_per_round", self.calls_per_round, 1)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def resolve_device(device: Union[None, str, torch.device]) -> torch.device:
    """``device`` as a ``torch.device`` (``None``: CPU); ``ValueError`` for CUDA where there is none."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


class Clock:
    """Times one call on ``device`` (module docstring): :meth:`__call__` returns ``(result, seconds)``."""

    def __init__(self, device: Union[None, str, torch.device] = None, flush_l2: bool = False):
        self.device = resolve_device(device)
        self.cuda = self.device.type == "cuda"
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=self.device) \
            if self.cuda and flush_l2 else None

    def __call__(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        if not self.cuda:
            t0 = time.perf_counter()
            result = fn()
            return result, time.perf_counter() - t0
        with torch.cuda.device(self.device):
            if self.flush is not None:
                self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            return result, start.elapsed_time(end) / 1e3

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def timed_call(fn: Callable[[], Any], device: Union[None, str, torch.device] = None) -> tuple[Any, float]:
    """Run ``fn()`` once: ``(its result, seconds)`` (CPU wall time, or CUDA event time)."""
    return Clock(device)(fn)


def interleaved_medians(cases: Mapping[K, Union[Callable[[], Any], Case]], rounds: int, *, warmup: int = 1,
                        device: Union[None, str, torch.device] = None, flush_l2: bool = False,
                        max_seconds: Optional[float] = None, progress: bool = False) -> dict[K, float]:
    """Median **seconds** per call of each case, timed in interleaved rounds.

    Args:
        cases: name → a callable or a :class:`Case`.
        rounds: rounds of timed calls (each case ``calls_per_round`` calls a round).
        warmup: untimed calls of each case before the first round.
        device: where the cases run (``None``: CPU); CUDA is timed with events.
        flush_l2: CUDA only: zero a 256 MiB buffer before each timed call.
        max_seconds: stop after the round in which this much wall time was spent (at least
            ``min(rounds, 3)`` rounds run).
        progress: a ``tqdm`` bar over the rounds.

    Returns:
        name → median seconds of one call, in the order of ``cases``.
    """
    _check_int("rounds", rounds, 1)
    _check_int("warmup", warmup, 0)
    cases = {name: c if isinstance(c, Case) else Case(c) for name, c in cases.items()}
    clock = Clock(device, flush_l2)
    for case in cases.values():
        for _ in range(warmup):
            case.fn()
            if case.reset is not None:
                case.reset()
    clock.synchronize()
    times: dict[K, list[float]] = {name: [] for name in cases}
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    for r in tqdm(range(rounds), desc="rounds", disable=not progress):
        for name, case in cases.items():
            for _ in range(case.calls_per_round):
                times[name].append(clock(case.fn)[1])
                if case.reset is not None:
                    case.reset()
        if deadline is not None and r + 1 >= min(rounds, 3) and time.perf_counter() > deadline:
            break
    return {name: statistics.median(t) for name, t in times.items()}


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1,
                device: Union[None, str, torch.device] = None, **options) -> float:
    """Median seconds of ``fn()`` over ``repeats`` timed calls after ``warmup`` untimed ones (one case
    of :func:`interleaved_medians`; ``options``: its ``flush_l2``, ``max_seconds``)."""
    return interleaved_medians({"fn": fn}, repeats, warmup=warmup, device=device, **options)["fn"]
