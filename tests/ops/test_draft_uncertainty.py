"""The public op: validation messages, backend selection, torch.library contract, properties."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import epikern as ek
from epikern import backends
from epikern.backends import BackendUnavailableError
from tests._cases import assert_close, make_logits

CPU_BACKENDS = ["torch", "cpu"]


def _inputs(K=3, N=4, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, N, V, generator=g), torch.randn(N, V, generator=g)


# --- bad input: one test per error path of design §3 ----------------------------------------------

@pytest.mark.parametrize("draft_shape,target_shape,match", [
    ((3, 4, 50), (2, 4, 50), r"target_logits must have rank 2"),
    ((3, 4, 50), (5, 50), r"batch shapes differ: drafts \(3, 4, 50\) vs target \(5, 50\)"),
    ((3, 4, 50), (4, 60), r"vocabulary mismatch: draft_logits \(3, 4, 50\) has V=50, target_logits \(4, 60\) has V=60; pass vocab_size="),
    ((0, 4, 50), (4, 50), r"at least one draft \(K >= 1\), got shape \(0, 4, 50\)"),
    ((3,), None, r"draft_logits must have at least 2 dims, got shape \(3,\)"),
    ((3, 4, 0), (4, 0), r"vocabulary is empty"),
])
def test_shape_errors(draft_shape, target_shape, match):
    target = None if target_shape is None else torch.zeros(target_shape)
    with pytest.raises(ValueError, match=match):
        ek.draft_uncertainty(torch.zeros(draft_shape), target)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    d, t = _inputs()
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0"):
        ek.draft_uncertainty(d, t, temperature=temperature)


@pytest.mark.parametrize("weights,match", [
    ([0.5, 0.5], r"weights must have 3 entries \(one per draft\), got 2"),
    ([0.5, 0.7, -0.2], r"weights must be finite and non-negative"),
    ([0.5, 0.5, 0.5], r"weights must sum to 1 \(within 1e-5\), got sum 1.5"),
    (torch.tensor([[1.0, 0.0, 0.0]]), r"weights must have shape \[3\] \(one per draft\), got \(1, 3\)"),
    (torch.tensor([1, 0, 0]), r"weights must be a floating tensor, got torch.int64"),
    (torch.tensor([0.2, 0.2, 0.2]), r"weights must sum to 1"),
])
def test_bad_weights(weights, match):
    d, t = _inputs()
    with pytest.raises((ValueError, TypeError), match=match):
        ek.draft_uncertainty(d, t, weights=weights)


def test_integer_dtype():
    d, t = _inputs()
    with pytest.raises(TypeError, match=r"draft_logits must be a floating tensor .* got torch.int32"):
        ek.draft_uncertainty(d.to(torch.int32), t)
    with pytest.raises(TypeError, match=r"target_logits must be a floating tensor .* got torch.int64"):
        ek.draft_uncertainty(d, t.long())


def test_float64_only_on_reference():
    d, t = _inputs()
    with pytest.raises(TypeError, match=r"draft_logits is torch.float64, which only backend='torch'"):
        ek.draft_uncertainty(d.double(), t, backend="cpu")
    out = ek.draft_uncertainty(d.double(), t.double(), backend="torch")
    assert out.eu.dtype == torch.float32


def test_different_devices():
    d, t = _inputs()
    with pytest.raises(ValueError, match=r"all tensors must be on one device, got draft_logits on cpu, "
                                         r"target_logits on meta"):
        ek.draft_uncertainty(d, t.to("meta"))


def test_vocab_size_compares_the_shared_prefix():
    d, t = _inputs(V=60)
    padded = torch.cat([t[:, :50], torch.full((4, 14), -1e4)], dim=-1)
    out = ek.draft_uncertainty(d[..., :50].contiguous(), padded, vocab_size=50, backend="torch")
    ref = ek.draft_uncertainty(d[..., :50], t[:, :50], backend="torch")
    assert_close("eu", out.eu, ref.eu)
    with pytest.raises(ValueError, match=r"vocab_size=70 exceeds the vocabulary of the inputs \(draft_logits 60, target_logits 64\)"):
        ek.draft_uncertainty(d, padded, vocab_size=70)


# --- backend selection -----------------------------------------------------------------------------

def test_unknown_backend():
    d, t = _inputs()
    with pytest.raises(ValueError, match=r"unknown backend 'fast'; choose one of cuda, triton, cpu, torch"):
        ek.draft_uncertainty(d, t, backend="fast")


def test_cuda_backend_on_cpu_tensors_says_why():
    d, t = _inputs()
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' needs CUDA tensors, got tensors on cpu"):
        ek.draft_uncertainty(d, t, backend="cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    d, t = _inputs()
    with pytest.raises(BackendUnavailableError, match=r"set TRITON_INTERPRET=1"):
        ek.draft_uncertainty(d, t, backend="triton")


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("EPIKERN_BACKEND", "torch")
    assert backends.select("draft_uncertainty", torch.device("cpu")) == "torch"
    monkeypatch.setenv("EPIKERN_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        backends.select("draft_uncertainty", torch.device("cpu"))


def test_cpu_tensors_default_to_the_compiled_cpu_backend(monkeypatch):
    monkeypatch.delenv("EPIKERN_BACKEND", raising=False)
    assert backends.select("draft_uncertainty", torch.device("cpu")) == "cpu"


# --- torch.library contract ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_target", [True, False])
def test_opcheck(backend, with_target):
    d, t = _inputs()
    w = torch.tensor([0.2, 0.3, 0.5])
    # Without a target some outputs are NaN by contract, which opcheck's output comparisons of
    # traced vs eager runs would flag; those runs are covered by the compile test instead.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") + (
        ("test_aot_dispatch_dynamic",) if with_target else ())
    torch.library.opcheck(torch.ops.epikern.draft_uncertainty.default,
                          (d, t if with_target else None, w, 1.3, True, backend), test_utils=utils)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph(backend):
    d, t = _inputs(K=4, N=6, V=300)

    def fn(d, t):
        u = ek.draft_uncertainty(d, t, weights=[0.1, 0.2, 0.3, 0.4], temperature=0.8, backend=backend)
        return u.eu * 2 + u.jsd

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    assert_close("compiled", compiled(d, t), fn(d, t), atol=1e-6, rtol=1e-6)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        d = torch.empty(3, 2, 5, 100, dtype=torch.bfloat16)
        u = ek.draft_uncertainty(d, torch.empty(2, 5, 100), backend="cpu")
        assert u.eu.shape == (2, 5) and u.eu.dtype == torch.float32
        assert u.draft_lse.shape == (3, 2, 5)


# --- properties (hypothesis) -----------------------------------------------------------------------

_small = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def _problem(draw):
    K = draw(st.integers(1, 5))
    V = draw(st.integers(1, 300))
    N = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "peaked", "flat"]))
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(K, generator=g) + 0.01
    weights = (raw / raw.sum()).tolist()
    temperature = draw(st.floats(0.3, 3.0))
    return (make_logits((K, N, V), kind, generator=g), make_logits((N, V), kind, generator=g),
            weights, temperature)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@_small
@given(problem=_problem())
def test_bias_variance_identity_and_signs(backend, problem):
    d, t, w, T = problem
    u = ek.draft_uncertainty(d, t, weights=w, temperature=T, backend=backend)
    assert_close("eu = jsd + kl", u.eu, u.jsd + u.kl)
    assert (u.jsd >= -1e-5).all() and (u.kl >= -1e-5).all()
    assert (u.mixture_entropy >= u.draft_entropy - 1e-5).all()  # concavity of H
    assert (u.mixture_entropy <= math.log(d.shape[-1]) + 1e-4).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@_small
@given(problem=_problem(), shifts=st.lists(st.floats(-50, 50), min_size=6, max_size=6))
def test_invariant_to_a_constant_per_row(backend, problem, shifts):
    d, t, w, T = problem
    K, N = d.shape[:2]
    shift = torch.tensor(shifts)
    u = ek.draft_uncertainty(d, t, weights=w, temperature=T, backend=backend)
    moved = ek.draft_uncertainty(d + shift[:K, None, None], t + shift[-1], weights=w,
                                 temperature=T, backend=backend)
    for name in ("eu", "jsd", "kl", "draft_entropy", "mixture_entropy", "target_entropy"):
        assert_close(name, getattr(moved, name), getattr(u, name), atol=2e-4, rtol=2e-4)


# --- DraftUncertaintyScorer: the same op with its settings checked once ---------------------------

def _same(out, ref):
    for name, a, b in zip(ek.DraftUncertainty._fields, out, ref):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("settings_", [
    {},
    {"weights": [0.1, 0.2, 0.3, 0.4], "temperature": 0.7},
    {"weights": torch.tensor([0.25, 0.25, 0.5, 0.0], dtype=torch.float64), "decompose": False},
    {"vocab_size": 40},
])
@pytest.mark.parametrize("with_target", [True, False])
def test_scorer_equals_the_op(backend, settings_, with_target, monkeypatch):
    g = torch.Generator().manual_seed(7)
    d = make_logits((4, 2, 3, 50), "masked", generator=g)
    t = make_logits((2, 3, 60 if "vocab_size" in settings_ else 50), "masked", generator=g) if with_target else None
    cases = [(d, t), (d.transpose(1, 2), None if t is None else t.transpose(0, 1)),  # other strides
             (d[:, :1, 0].half(), None if t is None else t[:1, 0])]  # fp16 drafts, fp32 reference
    refs = [ek.draft_uncertainty(*case, backend=backend, **settings_) for case in cases]
    scorer = ek.DraftUncertaintyScorer(4, "cpu", backend=backend, **settings_)
    # the fast path must not fall back to the op (which would make this comparison vacuous)
    module = importlib.import_module("epikern.ops.draft_uncertainty")  # the module, not the function
    monkeypatch.setattr(module, "draft_uncertainty", lambda *a, **k: pytest.fail("fell back to the op"))
    for case, ref in zip(cases, refs):
        _same(scorer(*case), ref)


@pytest.mark.parametrize("draft_shape,target_shape,match", [
    ((3, 4, 50), (4, 50), r"weights must have shape \[3\]"),  # K differs from the scorer's
    ((4, 4, 50), (5, 50), r"batch shapes differ"),
    ((4, 4, 50), (4, 60), r"vocabulary mismatch"),
    ((4, 4, 50), (2, 4, 50), r"target_logits must have rank 2"),
])
def test_scorer_falls_back_to_the_ops_errors(draft_shape, target_shape, match):
    scorer = ek.DraftUncertaintyScorer(4, "cpu", weights=torch.full((4,), 0.25))
    with pytest.raises(ValueError, match=match):
        scorer(torch.zeros(draft_shape), torch.zeros(target_shape))


def test_scorer_checks_its_settings_once():
    with pytest.raises(ValueError, match=r"num_drafts must be >= 1"):
        ek.DraftUncertaintyScorer(0, "cpu")
    with pytest.raises(ValueError, match=r"vocab_size must be a positive int"):
        ek.DraftUncertaintyScorer(2, "cpu", vocab_size=0)
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0"):
        ek.DraftUncertaintyScorer(2, "cpu", temperature=0.0)
    with pytest.raises(ValueError, match=r"weights must sum to 1"):
        ek.DraftUncertaintyScorer(2, "cpu", weights=[0.5, 0.6])
    with pytest.raises(ValueError, match=r"unknown backend"):
        ek.DraftUncertaintyScorer(2, "cpu", backend="nope")


def test_scorer_is_seen_by_flop_counter_and_compile():
    from epikern.eval.cost import count_flops
    d, t = _inputs(K=3, N=4, V=50)
    scorer = ek.DraftUncertaintyScorer(3, "cpu", backend="cpu")
    _, total, per_op = count_flops(scorer, d, t)
    assert per_op == {"epikern.draft_uncertainty": total} and total > 0
    compiled = torch.compile(lambda d, t: scorer(d, t).eu, fullgraph=True, backend="inductor")
    assert_close("compiled scorer", compiled(d, t), ek.draft_uncertainty(d, t).eu, atol=1e-6, rtol=1e-6)
