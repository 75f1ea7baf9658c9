"""+inf, never NaN: rows with a > 90-nat logit spread and a masked reference, on every backend.

A row whose draft (``draft_uncertainty``) or teacher (``forward_kl``) puts mass on an entry the
reference gives probability 0 has ``KL = +inf``. The kernels carry that as a cross term ``c = +inf``
in their online-softmax state; when a later block (or a merged partial state) raises the running
max by more than ~87 nats the rescale factor ``e^{m − m'}`` flushes to 0 (the device's
``ex2.approx.ftz``; any fp32 exp below −104 nats), and ``0·inf`` would be NaN. The masked entry
comes first (its +inf is in a state before the max jumps) or last (its ``e^{x−m}`` underflows:
still +inf, as forward_kl's cross term already is). Spreads: 95 nats
(the flush window of the device exp; every fp32 exp on the host still sees the mass) and 120 nats
(beyond fp32's exp range: host exps flush too). The device's own arithmetic is emulated on the
host by ``test_cuda_row_math.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

import epikern as ek
from epikern.backends import reference
from tests._cases import masked_spread_rows

HAS_CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
# numpy's warnings for the guarded −inf arithmetic the Triton interpreter evaluates
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

#: (backend, device, environment) — Triton on the CPU interpreter without a GPU (tests/conftest.py)
BACKENDS = [
    pytest.param(("torch", "cpu", {}), id="torch"),
    pytest.param(("cpu", "cpu", {}), id="cpu"),
    pytest.param(("triton", "cuda" if HAS_CUDA else "cpu",
                  {"EPIKERN_TRITON_PATH": "row", "EPIKERN_TRITON_BLOCK_V": "256"}), id="triton-row",
                 marks=pytest.mark.triton),
    pytest.param(("triton", "cuda" if HAS_CUDA else "cpu",
                  {"EPIKERN_TRITON_PATH": "split", "EPIKERN_TRITON_BLOCK_V": "128",
                   "EPIKERN_TRITON_CHUNKS": "3"}), id="triton-split", marks=pytest.mark.triton),
    pytest.param(("cuda", "cuda", {"EPIKERN_CUDA_PATH": "split"}), id="cuda-split", marks=gpu),
    pytest.param(("cuda", "cuda", {"EPIKERN_CUDA_PATH": "auto"}), id="cuda-auto", marks=gpu),
]
SPREADS = [95.0, 120.0]
V = 5000  # several CPU (2048) and Triton blocks and chunks: the big logit sits in a later block


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    name, device, env = request.param
    if name == "triton":
        pytest.importorskip("triton")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return name, device


@pytest.mark.parametrize("mass_first", [True, False], ids=["mass-first", "peak-first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("spread", SPREADS)
def test_draft_uncertainty_is_inf(backend, spread, dtype, mass_first):
    name, device = backend
    draft, target = masked_spread_rows(spread, V=V, mass_first=mass_first)
    draft, target = draft.to(dtype), target.to(dtype)
    oracle = reference.draft_uncertainty(draft, target, torch.full((2,), 0.5))[0]
    assert torch.isposinf(oracle[0]).all() and torch.isposinf(oracle[2]).all()  # eu, kl
    out = ek.draft_uncertainty(draft.to(device), target.to(device), backend=name)
    for field in ("eu", "jsd", "kl", "draft_entropy", "mixture_entropy", "target_entropy"):
        assert not getattr(out, field).isnan().any(), f"{name}: NaN in {field}"
    assert torch.isposinf(out.eu).all(), f"{name}: eu = {out.eu.tolist()}"
    # kl = +inf wherever eu is, even where q̄ underflows in fp32 (the CUDA kernel: not yet checked on a GPU)
    if device != "cuda":
        assert torch.isposinf(out.kl).all(), f"{name}: kl = {out.kl.tolist()}"
    assert torch.isfinite(out.jsd).all() and torch.isfinite(out.draft_lse).all()


@pytest.mark.parametrize("mass_first", [True, False], ids=["mass-first", "peak-first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("spread", SPREADS)
def test_forward_kl_is_inf(backend, spread, dtype, mass_first):
    name, device = backend
    if name == "cuda":
        pytest.skip("backend 'cuda' has no forward_kl")
    teacher = masked_spread_rows(spread, K=1, V=V, mass_first=mass_first)[0][0]
    student = masked_spread_rows(spread, K=1, V=V, seed=1, mass_first=mass_first)[1]
    teacher, student = teacher.to(dtype), student.to(dtype)  # teacher mass where the student is −inf
    assert torch.isposinf(reference.forward_kl(student, teacher, reduction="none")).all()
    loss = ek.forward_kl(student.to(device), teacher.to(device), reduction="none", backend=name)
    assert torch.isposinf(loss).all(), f"{name}: {loss.tolist()}"
