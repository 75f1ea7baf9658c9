"""Fixtures of the backend tests."""

from __future__ import annotations

import pytest

try:
    from epikern import _cpu
except ImportError:  # not built (the CPU test modules skip), or a bad EPIKERN_CPU_ISA
    _cpu = None


@pytest.fixture(params=_cpu.supported_isas() if _cpu is not None else ["unbuilt"])
def cpu_isa(request):
    """Each ISA variant of ``epikern._cpu`` this CPU runs (x86-64: baseline, avx2, avx512), made
    the module's for the test."""
    if _cpu is None:
        pytest.skip("epikern._cpu is not built (pip install -e .)")
    before = _cpu.isa()
    _cpu.set_isa(request.param)
    yield request.param
    _cpu.set_isa(before)
