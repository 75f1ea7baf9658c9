"""``epikern.eval.timing``: interleaved rounds, warm-up, per-case repeats and resets, medians, the
time budget and bad arguments (what each call did, never how long it took beyond a lower bound)."""

from __future__ import annotations

import time

import pytest
import torch

from epikern.eval.timing import Case, interleaved_medians, median_time, timed_call


def test_rounds_interleave_the_cases_after_one_warm_up_each():
    log = []
    cases = {"a": lambda: log.append("a"), "b": Case(lambda: log.append("b"), calls_per_round=2,
                                                     reset=lambda: log.append("reset b"))}
    medians = interleaved_medians(cases, rounds=2)
    assert list(medians) == ["a", "b"] and all(m >= 0 for m in medians.values())
    warm = ["a", "b", "reset b"]
    one_round = ["a", "b", "reset b", "b", "reset b"]
    assert log == warm + one_round + one_round


def test_the_median_is_of_the_timed_calls_only():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    median = median_time(fn, repeats=5, warmup=2, device="cpu")
    assert len(calls) == 7
    assert median >= 0.002  # sleep guarantees at least this; no upper bound is asserted


def test_a_spent_budget_stops_after_three_rounds():
    calls = []
    interleaved_medians({"x": lambda: calls.append(1)}, rounds=50, warmup=0, max_seconds=0.0)
    assert len(calls) == 3


def test_timed_call_returns_the_result():
    result, seconds = timed_call(lambda: torch.ones(3).sum())
    assert float(result) == 3.0 and seconds >= 0


def test_bad_arguments():
    for kwargs in ({"rounds": 0}, {"warmup": -1}, {"rounds": 2.0}, {"rounds": True}):
        with pytest.raises(ValueError, match="must be an int"):
            interleaved_medians({"f": lambda: None}, **{"rounds": 1, **kwargs})
    with pytest.raises(ValueError, match="calls_per_round"):
        Case(lambda: None, calls_per_round=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_requested_without_cuda_fails_clearly():
    with pytest.raises(ValueError, match="CUDA is not available"):
        median_time(lambda: None, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events_time_the_device_work():
    x = torch.randn(2048, 2048, device="cuda")
    result, seconds = timed_call(lambda: x @ x, device="cuda")
    torch.testing.assert_close(result, x @ x)
    assert seconds > 0 and median_time(lambda: x @ x, repeats=3, device="cuda", flush_l2=True) > 0
