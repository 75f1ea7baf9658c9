"""GPU tests of the CUDA kernels (``backend="cuda"``), run by benchmarks/gpu_check.sh.

The design §8 matrix runs on each kernel path, forced through ``EPIKERN_CUDA_PATH``: ``split``
(any GPU; split vocabulary, partial states merged through a workspace) and ``cluster`` (sm_90+;
a row held in the shared memory of a thread-block cluster), with the design §8 properties
(hypothesis), ``opcheck`` and ``torch.compile(fullgraph=True)`` on CUDA tensors. Then what only a
GPU shows: the current stream and device are respected, CUDA-graph capture, bitwise determinism,
grids over 65535 CTAs, row blocks of the split path, and no local memory in any kernel. Every
test skips with a reason when ``torch.cuda.is_available()`` is False.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import epikern as ek
from epikern.backends import cuda as cuda_backend
from tests._cases import (KINDS, assert_close, assert_close_stats, assert_special_rows, make_logits,
                          reference_stats, special_rows)
from tests.ops.test_draft_uncertainty import _problem

HAS_CUDA = torch.cuda.is_available()
SM90 = HAS_CUDA and torch.cuda.get_device_capability()[0] >= 9

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA,
                       reason="the CUDA kernels need a CUDA GPU (torch.cuda.is_available() is False)"),
]

PATHS = [
    pytest.param("split", id="split"),
    pytest.param("cluster", id="cluster",
                 marks=pytest.mark.skipif(not SM90, reason="the cluster path needs an sm_90+ GPU")),
]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("EPIKERN_CUDA_PATH", request.param)
    return request.param


def _run(draft, target, **kw):
    target = None if target is None else target.cuda()
    return ek.draft_uncertainty(draft.cuda(), target, backend="cuda", **kw)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("V", [1000, 32000])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("K", [1, 2, 4, 7])
def test_matches_reference(path, K, kind, V):
    g = _gen(V + 13 * K)
    draft = make_logits((K, 5, V), kind, generator=g)
    target = make_logits((5, V), kind, generator=g)
    assert_close_stats(_run(draft, target), reference_stats(draft, target))


@pytest.mark.parametrize("draft_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_pairs(path, draft_dtype, target_dtype):
    g = _gen(2)
    draft = make_logits((4, 6, 4096), "peaked", dtype=draft_dtype, generator=g)
    target = make_logits((6, 4096), "normal", dtype=target_dtype, generator=g)
    assert_close_stats(_run(draft, target), reference_stats(draft, target))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aligned_rows_with_a_ragged_tail(path, dtype):
    # Row strides of 1032 elements keep every row 16-byte aligned; V = 1027 leaves a last span
    # whose final 3 elements are read outside the vector loads (from global memory). Views are
    # taken on the GPU: .cuda() of a view with gaps would copy it densely.
    g = _gen(3)
    draft = make_logits((3, 4, 1032), "normal", dtype=dtype, generator=g, device="cuda")[..., :1027]
    target = make_logits((4, 1032), "masked", dtype=dtype, generator=g, device="cuda")[..., :1027]
    assert_close_stats(_run(draft, target), reference_stats(draft, target))


def test_unaligned_rows_take_the_split_path(monkeypatch):
    g = _gen(4)
    draft = make_logits((2, 3, 1023), "normal", generator=g)
    target = make_logits((3, 1023), "normal", generator=g)
    assert cuda_backend.plan(draft.cuda(), target.cuda())["path"] == "split"
    assert_close_stats(_run(draft, target), reference_stats(draft, target))
    monkeypatch.setenv("EPIKERN_CUDA_PATH", "cluster")
    with pytest.raises(ValueError, match="cluster path cannot run"):
        _run(draft, target)


def test_decode_shape_large_vocabulary(path):
    g = _gen(5)
    draft = make_logits((4, 3, 128256), "peaked", dtype=torch.bfloat16, generator=g)
    target = make_logits((3, 128256), "peaked", dtype=torch.float32, generator=g)
    plan = cuda_backend.plan(draft.cuda(), target.cuda())
    assert plan["path"] == path
    assert (plan["cluster"] if path == "cluster" else plan["splits"]) > 1  # the row is spread
    assert_close_stats(_run(draft, target), reference_stats(draft, target))


def test_split_path_row_blocks(path):
    # With decompose, the split path runs rows in blocks that fit half of L2 (several launches).
    g = _gen(6)
    draft = make_logits((2, 200, 32000), "normal", dtype=torch.bfloat16, generator=g)
    target = make_logits((200, 32000), "normal", dtype=torch.bfloat16, generator=g)
    plan = cuda_backend.plan(draft.cuda(), target.cuda())
    if path == "split":
        assert plan["rows_per_launch"] < 200
    assert_close_stats(_run(draft, target), reference_stats(draft, target))


@pytest.mark.parametrize("K,dtype", [(9, torch.float32), (32, torch.bfloat16)])
def test_many_drafts_without_reference(path, K, dtype):
    g = _gen(K)
    members = make_logits((K, 4, 16000), "normal", dtype=dtype, generator=g)
    out = _run(members, None)
    assert_close_stats(out, reference_stats(members, None))
    e = ek.ensemble_uncertainty(members.cuda(), backend="cuda")
    assert_close("epistemic", e.epistemic, out.jsd)


@pytest.mark.parametrize("temperature", [0.25, 2.5])
def test_temperature_and_weights(path, temperature):
    g = _gen(7)
    draft = make_logits((4, 6, 1000), "normal", generator=g)
    target = make_logits((6, 1000), "normal", generator=g)
    weights = torch.tensor([0.5, 0.2, 0.0, 0.3], device="cuda")
    out = _run(draft, target, weights=weights, temperature=temperature)
    assert_close_stats(out, reference_stats(draft, target, weights.tolist(), temperature))


def test_non_contiguous_inputs(path):
    g = _gen(8)
    base = make_logits((6, 8, 2000), "normal", generator=g, device="cuda")
    draft = base[1:5, ::2, :1000]  # strided K and N (views on the GPU, not dense copies)
    target = make_logits((8, 2000), "normal", generator=g, device="cuda")[::2, 1000:]
    assert draft.stride() == (16000, 4000, 1) and target.stride() == (4000, 1)
    assert_close_stats(_run(draft, target), reference_stats(draft, target))


def test_decompose_false_and_identical_drafts(path):
    g = _gen(9)
    draft = make_logits((1, 4, 1024), "peaked", generator=g, device="cuda").expand(3, -1, -1)
    target = make_logits((4, 1024), "normal", generator=g)
    out = _run(draft, target)
    assert_close_stats(out, reference_stats(draft, target))
    assert out.jsd.abs().max() <= 1e-4
    out = _run(draft, target, decompose=False)
    assert_close_stats(out, reference_stats(draft, target, decompose=False))


def test_infinite_and_nan_rows(path):
    draft, target = special_rows(V=512)
    out = _run(draft, target)
    assert_close_stats(out, reference_stats(draft, target))
    assert_special_rows(out)


def test_more_than_65535_ctas(path):
    g = _gen(12)
    draft = make_logits((2, 70000, 64), "normal", generator=g)
    target = make_logits((70000, 64), "normal", generator=g)
    out = _run(draft, target, decompose=False)  # one launch of 70000 CTAs (split) or clusters
    assert_close_stats(out, reference_stats(draft, target, decompose=False))


def test_bitwise_deterministic(path):
    g = _gen(13)
    draft = make_logits((4, 16, 32000), "peaked", dtype=torch.bfloat16, generator=g).cuda()
    target = make_logits((16, 32000), "normal", dtype=torch.bfloat16, generator=g).cuda()
    a = ek.draft_uncertainty(draft, target, backend="cuda")
    b = ek.draft_uncertainty(draft, target, backend="cuda")
    for name, x, y in zip(a._fields, a, b):
        assert torch.equal(x, y), name


def test_runs_on_the_current_stream():
    # The inputs are written on a side stream behind a long sleep; reading them on any other
    # stream would see the zeros they start as.
    g = _gen(14)
    draft = make_logits((4, 8, 32000), "normal", generator=g).cuda()
    target = make_logits((8, 32000), "normal", generator=g).cuda()
    d, t = torch.zeros_like(draft), torch.zeros_like(target)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        d.copy_(draft)
        t.copy_(target)
        out = ek.draft_uncertainty(d, t, backend="cuda")
    side.synchronize()
    assert_close_stats(out, reference_stats(draft, target))


def test_cuda_graph_capture(path):
    g = _gen(15)
    draft = make_logits((4, 8, 32000), "normal", dtype=torch.bfloat16, generator=g).cuda()
    target = make_logits((8, 32000), "normal", dtype=torch.bfloat16, generator=g).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (first-use attribute setup)
        ek.draft_uncertainty(draft, target, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ek.draft_uncertainty(draft, target, backend="cuda")
    new_draft = make_logits((4, 8, 32000), "peaked", dtype=torch.bfloat16, generator=g)
    new_target = make_logits((8, 32000), "normal", dtype=torch.bfloat16, generator=g)
    draft.copy_(new_draft)
    target.copy_(new_target)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_stats(out, reference_stats(new_draft, new_target))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_tensors_device():
    g = _gen(16)
    draft = make_logits((2, 4, 1000), "normal", generator=g)
    target = make_logits((4, 1000), "normal", generator=g)
    with torch.cuda.device(0):
        out = ek.draft_uncertainty(draft.to("cuda:1"), target.to("cuda:1"), backend="cuda")
    assert out.eu.device == torch.device("cuda:1")
    assert_close_stats(out, reference_stats(draft, target))


def test_kernels_use_no_local_memory():
    infos = cuda_backend._module().kernel_attributes()
    assert len(infos) == 27
    for info in infos:
        assert info["local_bytes"] == 0, info
        if SM90 and info["name"].startswith("cluster_kernel"):
            assert info["ptx_version"] >= 90 and info["binary_version"] >= 90, info


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=_problem())
def test_properties(problem):
    d, t, w, T = problem
    d, t = d.cuda(), t.cuda()
    u = ek.draft_uncertainty(d, t, weights=w, temperature=T, backend="cuda")
    assert_close("eu = jsd + kl", u.eu, u.jsd + u.kl)
    assert (u.jsd >= -1e-5).all() and (u.kl >= -1e-5).all()
    assert (u.mixture_entropy >= u.draft_entropy - 1e-5).all()
    assert (u.mixture_entropy <= math.log(d.shape[-1]) + 1e-4).all()
    moved = ek.draft_uncertainty(d + 7.5, t - 3.25, weights=w, temperature=T, backend="cuda")
    for name in ("eu", "jsd", "kl", "draft_entropy", "mixture_entropy", "target_entropy"):
        assert_close(name, getattr(moved, name), getattr(u, name), atol=2e-4, rtol=2e-4)


def test_opcheck_and_compile():
    g = _gen(17)
    d = make_logits((3, 4, 64), "normal", generator=g).cuda()
    t = make_logits((4, 64), "normal", generator=g).cuda()
    w = torch.tensor([0.2, 0.3, 0.5], device="cuda")
    torch.library.opcheck(torch.ops.epikern.draft_uncertainty.default, (d, t, w, 1.3, True, "cuda"),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor", "test_aot_dispatch_dynamic"))

    def fn(d, t):
        u = ek.draft_uncertainty(d, t, weights=[0.2, 0.3, 0.5], temperature=0.8, backend="cuda")
        return u.eu * 2 + u.jsd

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    assert_close("compiled", compiled(d, t), fn(d, t), atol=1e-6, rtol=1e-6)
