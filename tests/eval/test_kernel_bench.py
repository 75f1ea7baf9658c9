"""``epikern bench kernels`` on a tiny shape: its table is printed once (rows as they are measured,
then the machine line), and its JSON holds the machine record and the kernel's calibration."""

from __future__ import annotations

import json

import pytest
import torch

from epikern import backends
from epikern.eval import kernel_bench


def _cpu_missing() -> bool:
    try:
        backends.get("cpu")
    except backends.BackendUnavailableError:
        return True
    return False


pytestmark = pytest.mark.skipif(_cpu_missing(), reason="needs the compiled CPU module")


def test_the_table_is_printed_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kernel_bench, "SHAPES", [(2, 4, 64, torch.float32)])
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the compiled contestants run eagerly here
    assert kernel_bench.main(["--quick", "--json", str(tmp_path / "k.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("| K×N×V |") == 1 and out.count("| 2×4×64 |") == 2  # decompose False and True
    saved = json.loads((tmp_path / "k.json").read_text())
    assert {"cpu", "cores", "clock_hz", "exp_ns", "loadavg_end"} <= set(saved["machine"])
    assert [r["decompose"] for r in saved["rows"]] == [False, True]
