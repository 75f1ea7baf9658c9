"""The ``cuda`` backend's availability, device handling and 64-bit offsets.

Automatic selection must fall back to Triton when ``epikern._cuda`` sees no device although torch
does (a driver older than the module's CUDA runtime): checked on any machine, in a fresh process
with a stand-in module. The GPU tests check that a scorer built for ``"cuda"`` takes its fast path
on the current device's tensors, and inputs with ``N·V > 2³¹`` elements on every kernel path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import epikern as ek
from tests._cases import assert_close, reference_stats

ROOT = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()
SM90 = HAS_CUDA and torch.cuda.get_device_capability()[0] >= 9
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


def test_module_without_a_device_falls_back_to_triton():
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import sys, types, warnings
        import torch
        torch.cuda.is_available = lambda: True          # torch's runtime sees a device ...
        fake = types.ModuleType("epikern._cuda")
        fake.device_count = lambda: 0                   # ... the module's older one does not
        sys.modules["epikern._cuda"] = fake
        import epikern
        epikern._cuda = fake
        from epikern import backends
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print(backends.select("draft_uncertainty", torch.device("cuda")))
        print(backends.is_available("cuda"))
        print(" | ".join(str(w.message) for w in caught))
    """)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    chosen, cuda_available, warned = proc.stdout.splitlines()
    assert chosen == "triton" and cuda_available == "False"
    assert "epikern._cuda sees no CUDA device" in warned


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_scorer_device_matches_the_tensors(device):
    """``"cuda"`` means the current device; tensors report it with its index."""
    torch.cuda.set_device(0)
    scorer = ek.DraftUncertaintyScorer(2, device)
    draft = torch.randn(2, 3, 100, device=device)
    target = torch.randn(3, 100, device=device)
    assert scorer.device == draft.device == torch.device("cuda", 0)
    got, expected = scorer(draft, target), ek.draft_uncertainty(draft, target)
    assert torch.equal(got.eu, expected.eu) and torch.equal(got.draft_lse, expected.draft_lse)


@pytest.mark.parametrize("path", [
    "split", pytest.param("cluster", marks=pytest.mark.skipif(not SM90, reason="needs sm_90+"))])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_int64_offsets(path, monkeypatch):
    """K·N·V and N·V > 2³¹ elements: the last rows (and the second draft) sit past the int32
    range; the row that straddles 2³¹ and the last rows match the float64 reference."""
    monkeypatch.setenv("EPIKERN_CUDA_PATH", path)
    K, N, V = 2, 16800, 128256
    assert N * V > 2**31
    g = torch.Generator(device="cuda").manual_seed(27)
    draft = torch.randn((K, N, V), device="cuda", dtype=torch.float16, generator=g)
    target = torch.randn((N, V), device="cuda", dtype=torch.float16, generator=g)
    out = ek.draft_uncertainty(draft, target, backend="cuda")
    straddle = 2**31 // V
    for rows in (slice(straddle, straddle + 2), slice(N - 2, N)):
        ref = reference_stats(draft[:, rows], target[rows])
        for name, expected in ref.items():
            assert_close(f"{name}[{rows}]", getattr(out, name)[..., rows], expected)
