"""design §8 matrix for ``draft_uncertainty`` / ``ensemble_uncertainty`` on every backend.

Each backend runs on the device it serves (cpu/torch on CPU tensors, cuda/triton on CUDA tensors)
and is compared with the float64 reference computed from the same (upcast) input values. GPU
backends skip with a reason on machines without CUDA; the CPU backend never skips (CI builds it).
"""

from __future__ import annotations

import pytest
import torch

import epikern as ek
from tests._cases import (KINDS, assert_close, assert_close_stats, assert_special_rows, make_logits,
                          reference_stats, special_rows)

HAS_CUDA = torch.cuda.is_available()
BACKENDS = [
    pytest.param(("torch", "cpu"), id="torch"),
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("cuda", "cuda"), id="cuda",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="backend 'cuda' needs a CUDA GPU")]),
    pytest.param(("triton", "cuda"), id="triton-gpu",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="Triton on GPU needs a CUDA GPU "
                                                            "(CPU interpreter: test_triton_interpret.py)")]),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _run(backend, draft, target, **kw):
    name, device = backend
    target = None if target is None else target.to(device)
    return ek.draft_uncertainty(draft.to(device), target, backend=name, **kw)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("V", [1000, 1023, 32000])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("K", [1, 2, 4, 7])
def test_matches_reference(backend, V, kind, K):
    g = _gen(V * 31 + K)
    draft = make_logits((K, 3, V), kind, generator=g)
    target = make_logits((3, V), kind, generator=g)
    # masked drafts put mass where a masked target has none: eu/kl = +inf is the right answer there
    out = _run(backend, draft, target)
    assert_close_stats(out, reference_stats(draft, target))


@pytest.mark.parametrize("draft_dtype,target_dtype", [
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_low_precision_inputs(backend, draft_dtype, target_dtype):
    g = _gen(7)
    draft = make_logits((4, 5, 1023), "peaked", dtype=draft_dtype, generator=g)
    target = make_logits((5, 1023), "normal", dtype=target_dtype, generator=g)
    assert_close_stats(_run(backend, draft, target), reference_stats(draft, target))


def test_large_vocabulary(backend):
    g = _gen(128256)
    draft = make_logits((4, 2, 128256), "peaked", dtype=torch.bfloat16, generator=g)
    target = make_logits((2, 128256), "peaked", dtype=torch.bfloat16, generator=g)
    assert_close_stats(_run(backend, draft, target), reference_stats(draft, target))


@pytest.mark.parametrize("temperature", [0.25, 0.7, 2.5])
def test_temperature_and_weights(backend, temperature):
    g = _gen(3)
    draft = make_logits((4, 6, 1000), "normal", generator=g)
    target = make_logits((6, 1000), "normal", generator=g)
    weights = [0.5, 0.2, 0.0, 0.3]
    out = _run(backend, draft, target, weights=weights, temperature=temperature)
    assert_close_stats(out, reference_stats(draft, target, weights, temperature))


def test_weights_as_tensor(backend):
    g = _gen(4)
    draft = make_logits((3, 4, 777), "normal", generator=g)
    target = make_logits((4, 777), "normal", generator=g)
    w = torch.tensor([0.6, 0.3, 0.1])
    out = _run(backend, draft, target, weights=w)
    assert_close_stats(out, reference_stats(draft, target, w.tolist()))


@pytest.mark.parametrize("K", [1, 3])
def test_identical_drafts_have_zero_jsd(backend, K):
    g = _gen(5)
    one = make_logits((1, 4, 1023), "peaked", generator=g)
    draft = one.expand(K, -1, -1)  # stride 0 over K: also a non-contiguous case
    target = make_logits((4, 1023), "normal", generator=g)
    out = _run(backend, draft, target)
    assert_close_stats(out, reference_stats(draft, target))
    assert out.jsd.abs().max() <= 1e-4
    assert_close("eu vs kl", out.eu, out.kl)


def test_non_contiguous_inputs(backend):
    g = _gen(6)
    device = backend[1]  # views are made on the device: .to(device) of a view would copy it
    base = make_logits((6, 8, 2 * 1000), "normal", generator=g, device=device)
    draft = base[1:5, ::2, :1000]  # strided K and N, unit stride on V
    target = make_logits((1000, 4), "normal", generator=g, device=device).t()  # strided V: copied
    assert not draft.is_contiguous() and target.stride(-1) != 1
    assert_close_stats(_run(backend, draft, target), reference_stats(draft, target))


def test_batch_shapes_and_no_target(backend):
    g = _gen(8)
    draft = make_logits((3, 2, 5, 300), "normal", generator=g)
    out = _run(backend, draft, None)
    ref = reference_stats(draft, None)
    assert out.eu.shape == (2, 5) and out.draft_lse.shape == (3, 2, 5)
    assert_close_stats(out, ref)
    assert out.eu.isnan().all() and out.kl.isnan().all() and out.target_lse.isnan().all()


def test_decompose_false(backend):
    g = _gen(9)
    draft = make_logits((4, 5, 1000), "normal", generator=g)
    target = make_logits((5, 1000), "normal", generator=g)
    out = _run(backend, draft, target, decompose=False)
    assert_close_stats(out, reference_stats(draft, target, decompose=False))
    assert out.jsd.isnan().all() and out.kl.isnan().all() and out.mixture_entropy.isnan().all()


def test_eu_is_jsd_plus_kl(backend):
    g = _gen(10)
    draft = make_logits((4, 16, 1023), "peaked", generator=g)
    target = make_logits((16, 1023), "peaked", generator=g)
    out = _run(backend, draft, target)
    assert_close("eu = jsd + kl", out.eu, out.jsd + out.kl)


def test_infinite_and_nan_rows(backend):
    draft, target = special_rows()
    out = _run(backend, draft, target)
    assert_close_stats(out, reference_stats(draft, target))
    assert_special_rows(out)


def test_empty_batch(backend):
    name, device = backend
    draft = torch.empty((3, 0, 100), device=device)
    out = ek.draft_uncertainty(draft, torch.empty((0, 100), device=device), backend=name)
    assert out.eu.shape == (0,) and out.draft_lse.shape == (3, 0)


def test_ensemble_uncertainty(backend):
    name, device = backend
    g = _gen(12)
    members = make_logits((5, 3, 4, 257), "normal", generator=g)
    e = ek.ensemble_uncertainty(members.to(device), temperature=1.5, backend=name)
    ref = reference_stats(members, None, temperature=1.5)
    assert_close("total", e.total, ref["mixture_entropy"])
    assert_close("aleatoric", e.aleatoric, ref["draft_entropy"])
    assert_close("epistemic", e.epistemic, ref["jsd"])
    assert_close("total - aleatoric", e.total - e.aleatoric, e.epistemic)
