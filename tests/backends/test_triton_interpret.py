"""Triton backend against the float64 reference (design §8), each path forced.

Without a CUDA GPU the kernels run on Triton's CPU interpreter (``TRITON_INTERPRET=1``, switched on
by ``tests/conftest.py``) at small sizes, fp32/fp16 only (bf16 is silently wrong in the interpreter); on
a GPU the same tests run the compiled kernels and add bf16, a > 2³¹-element input and
``torch.compile``. Small vocabulary blocks (``EPIKERN_TRITON_BLOCK_V``) and several chunks
(``EPIKERN_TRITON_CHUNKS``) make every loop, rescale and merge run more than once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import epikern as ek
from epikern.backends.triton import config
from tests._cases import KINDS, assert_close, assert_close_stats, make_logits, reference_stats

pytest.importorskip("triton")
# numpy's warnings for the guarded −inf arithmetic the interpreter evaluates on masked lanes
pytestmark = [pytest.mark.triton,
              pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")]

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (compiled Triton kernels)")
gpu_only = [pytest.mark.gpu, needs_gpu]

#: path → environment overrides that force it with small blocks and several chunks
PATHS = {
    "row": {"EPIKERN_TRITON_PATH": "row", "EPIKERN_TRITON_BLOCK_V": "256"},
    "split": {"EPIKERN_TRITON_PATH": "split", "EPIKERN_TRITON_BLOCK_V": "128",
              "EPIKERN_TRITON_CHUNKS": "3"},
}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    for key, value in PATHS[request.param].items():
        monkeypatch.setenv(key, value)
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run(draft, target, **kw):
    target = None if target is None else target.to(DEVICE)
    return ek.draft_uncertainty(draft.to(DEVICE), target, backend="triton", **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("K", [1, 2, 4, 7])
def test_matches_reference(path, K, kind):
    V = 1000 if kind in ("normal", "flat") else 1023
    g = _gen(K * 100 + KINDS.index(kind))
    draft = make_logits((K, 3, V), kind, generator=g)
    target = make_logits((3, V), kind, generator=g)
    assert_close_stats(_run(draft, target), reference_stats(draft, target))


@pytest.mark.parametrize("decompose", [True, False])
def test_without_target(path, decompose):
    g = _gen(11)
    draft = make_logits((4, 2, 1023), "peaked", generator=g)
    out = _run(draft, None, decompose=decompose)
    ref = reference_stats(draft, None, decompose=decompose)
    assert_close_stats(out, ref)
    assert out.eu.isnan().all() and out.target_lse.isnan().all()
    if decompose:
        ens = ek.ensemble_uncertainty(draft.to(DEVICE), backend="triton")
        assert_close("epistemic", ens.epistemic, ref["jsd"])
        assert_close("total", ens.total, ref["mixture_entropy"])
        assert_close("aleatoric", ens.aleatoric, ref["draft_entropy"])


def test_decompose_false_skips_mixture(path):
    g = _gen(12)
    draft = make_logits((2, 3, 1000), "normal", generator=g)
    target = make_logits((3, 1000), "normal", generator=g)
    out = _run(draft, target, decompose=False)
    assert_close_stats(out, reference_stats(draft, target, decompose=False))
    assert out.jsd.isnan().all() and out.kl.isnan().all() and out.mixture_entropy.isnan().all()


DTYPE_PAIRS = [(torch.float16, torch.float16), (torch.float32, torch.float16),
               (torch.float16, torch.float32)]
DTYPE_PAIRS += [pytest.param(d, t, marks=gpu_only) for d, t in [
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16)]]


@pytest.mark.parametrize("draft_dtype,target_dtype", DTYPE_PAIRS)
def test_low_precision_inputs(path, draft_dtype, target_dtype):
    g = _gen(13)
    draft = make_logits((4, 2, 1023), "masked", dtype=draft_dtype, generator=g)
    target = make_logits((2, 1023), "normal", dtype=target_dtype, generator=g)
    assert_close_stats(_run(draft, target), reference_stats(draft, target))


@pytest.mark.parametrize("weights,temperature", [((0.5, 0.3, 0.2, 0.0), 0.7),
                                                 ((0.1, 0.2, 0.3, 0.4), 2.5)])
def test_weights_and_temperature(path, weights, temperature):
    g = _gen(14)
    draft = make_logits((4, 2, 1000), "peaked", generator=g)
    target = make_logits((2, 1000), "peaked", generator=g)
    out = _run(draft, target, weights=weights, temperature=temperature)
    assert_close_stats(out, reference_stats(draft, target, weights, temperature))


def test_identical_drafts_and_single_draft_have_zero_jsd(path):
    g = _gen(15)
    one = make_logits((1, 3, 1023), "normal", generator=g)
    target = make_logits((3, 1023), "normal", generator=g)
    same = one.expand(3, 3, 1023)  # stride 0 over K
    for draft in (one, same):
        out = _run(draft, target)
        assert_close_stats(out, reference_stats(draft, target))
        assert out.jsd.abs().max().item() <= 1e-5
        assert_close("eu = kl", out.eu, out.kl)


def test_strided_rows(path):
    g = _gen(16)
    K, N, V = 3, 4, 1000
    base = make_logits((N, K, V + 7), "normal", generator=g)
    draft = base[..., 3:V + 3].permute(1, 0, 2)  # strides (V+7, K(V+7), 1), offset 3
    target = make_logits((2 * N, V + 5), "normal", generator=g)[::2, 1:V + 1]
    assert draft.stride() == (V + 7, K * (V + 7), 1) and target.stride() == (2 * (V + 5), 1)
    assert_close_stats(_run(draft, target), reference_stats(draft, target))


def test_strided_outputs_of_the_entry_point(path):
    """The backend entry point also fills non-contiguous output tensors."""
    from epikern.backends import entry
    from epikern.backends.reference import STATS

    g = _gen(22)
    K, N, V = 3, 2, 1000
    draft = make_logits((K, N, V), "normal", generator=g)
    target = make_logits((N, V), "normal", generator=g)
    stats = torch.full((N, len(STATS)), 7.0, device=DEVICE).t()
    draft_lse = torch.full((N, K), 7.0, device=DEVICE).t()
    target_lse = torch.full((2 * N,), 7.0, device=DEVICE)[::2]
    weights = torch.full((K,), 1 / K, device=DEVICE)
    entry("draft_uncertainty", "triton")(draft.to(DEVICE), target.to(DEVICE), weights, 1.0, True,
                                         stats, draft_lse, target_lse)
    ref = reference_stats(draft, target)
    for i, name in enumerate(STATS):
        assert_close(name, stats[i], ref[name])
    assert_close("draft_lse", draft_lse, ref["draft_lse"])
    assert_close("target_lse", target_lse, ref["target_lse"])


def test_edge_rows_stay_in_their_row(path):
    """−inf entries, an all −inf draft row, NaN, and mass where p = 0 (kl = eu = +inf)."""
    g = _gen(17)
    K, N, V = 2, 5, 1000
    draft = make_logits((K, N, V), "normal", generator=g)
    target = make_logits((N, V), "normal", generator=g)
    draft[:, 0, 500:] = float("-inf")   # masked tail in every draft, target finite
    target[0, 700:] = float("-inf")     # ... and in the target, inside the drafts' mask
    draft[1, 1, :] = float("-inf")      # a draft with no finite logit: NaN row
    target[2, 123] = float("nan")       # NaN in the target: NaN row
    target[3, :10] = float("-inf")      # p = 0 where the drafts have mass: eu = kl = +inf
    draft[0, 4, 999] = float("nan")     # NaN in the last element of a draft
    out = _run(draft, target)
    ref = reference_stats(draft, target)
    assert_close_stats(out, ref)
    assert out.eu[3].item() == float("inf") and out.kl[3].item() == float("inf")
    assert out.eu[0].isfinite().item() and out.jsd[[0, 3]].isfinite().all()
    assert out.eu[[1, 2, 4]].isnan().all()


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(K=st.integers(1, 5), N=st.integers(1, 3), V=st.integers(1, 300),
       seed=st.integers(0, 2**31 - 1), shift=st.floats(-40, 40), temperature=st.floats(0.25, 4))
def test_properties(path, K, N, V, seed, shift, temperature):
    """eu = jsd + kl, jsd ≥ 0, kl ≥ 0, and invariance to adding a constant to a row's logits."""
    g = _gen(seed)
    draft = 3 * torch.randn((K, N, V), generator=g)
    target = 3 * torch.randn((N, V), generator=g)
    u = _run(draft, target, temperature=temperature)
    tol = 1e-4 + 1e-4 * u.eu.abs()
    assert ((u.jsd + u.kl - u.eu).abs() <= tol).all()
    assert (u.jsd >= -1e-5).all() and (u.kl >= -1e-5).all()
    c_draft = shift * torch.rand((K, N, 1), generator=g)
    c_target = shift * torch.rand((N, 1), generator=g)
    v = _run(draft + c_draft, target + c_target, temperature=temperature)
    for name in ("eu", "jsd", "kl", "draft_entropy", "mixture_entropy", "target_entropy"):
        assert_close(name, getattr(v, name), getattr(u, name), atol=2e-4, rtol=2e-4)
    assert_close("draft_lse", v.draft_lse, u.draft_lse + c_draft[..., 0] / temperature,
                 atol=2e-4, rtol=2e-4)


def test_deterministic(path):
    g = _gen(18)
    draft = make_logits((4, 3, 1023), "peaked", generator=g).to(DEVICE)
    target = make_logits((3, 1023), "peaked", generator=g).to(DEVICE)
    a = ek.draft_uncertainty(draft, target, backend="triton")
    b = ek.draft_uncertainty(draft, target, backend="triton")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_automatic_configuration(monkeypatch):
    """Without overrides: few rows take the split path, many rows the row path."""
    for key in ("EPIKERN_TRITON_PATH", "EPIKERN_TRITON_BLOCK_V", "EPIKERN_TRITON_CHUNKS"):
        monkeypatch.delenv(key, raising=False)
    assert config.choose(4, 8, 128256, torch.bfloat16).path == "split"
    assert config.choose(4, 4096, 128256, torch.bfloat16).path == "row"
    assert config.choose(4, 1, 128256, torch.bfloat16).chunks > 1
    g = _gen(19)
    draft = make_logits((7, 2, 5000), "masked", generator=g)
    target = make_logits((2, 5000), "masked", generator=g)
    assert config.choose(7, 2, 5000, draft.dtype).path == "split"
    assert_close_stats(_run(draft, target), reference_stats(draft, target))
    monkeypatch.setattr(config, "SPLIT_MAX_ROWS", 1)
    assert config.choose(7, 2, 5000, draft.dtype).path == "row"
    assert_close_stats(_run(draft, target), reference_stats(draft, target))


@pytest.mark.parametrize("name,value,match", [
    ("EPIKERN_TRITON_PATH", "diagonal", "EPIKERN_TRITON_PATH must be one of"),
    ("EPIKERN_TRITON_BLOCK_V", "100", "power of two"),
    ("EPIKERN_TRITON_CHUNKS", "0", "EPIKERN_TRITON_CHUNKS must be in"),
])
def test_bad_overrides_raise(monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        config.choose(2, 4, 1000, torch.float32)


def test_too_many_drafts_raise():
    draft = torch.zeros(config.MAX_K + 1, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match=f"1 to {config.MAX_K} drafts"):
        ek.draft_uncertainty(draft, backend="triton")


def test_cpu_tensors_without_interpreter_raise_clearly():
    """CPU tensors need kernels built by the interpreter, i.e. TRITON_INTERPRET=1 before import."""
    code = textwrap.dedent("""
        import os, torch, epikern as ek
        x = torch.zeros(2, 1, 8)
        for step in ("unset", "set too late"):
            try:
                ek.draft_uncertainty(x, backend="triton")
            except ek.BackendUnavailableError as exc:
                print(step, "->", exc)
            import epikern.backends.triton.launch  # kernels now built for the GPU
            os.environ["TRITON_INTERPRET"] = "1"
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    assert lines[0].startswith("unset -> ") and "set TRITON_INTERPRET=1" in lines[0]
    assert lines[1].startswith("set too late -> ") and "compiled for the GPU" in lines[1]


@pytest.mark.gpu
@needs_gpu
def test_int64_offsets():
    """N·V > 2³¹ elements: the last rows read past the int32 range."""
    N, V = 16800, 128256
    assert N * V > 2**31
    g = torch.Generator(device="cuda").manual_seed(20)
    draft = torch.randn((1, N, V), device="cuda", dtype=torch.float16, generator=g)
    target = torch.randn((N, V), device="cuda", dtype=torch.float16, generator=g)
    out = ek.draft_uncertainty(draft, target, backend="triton")
    tail = slice(N - 3, N)
    ref = reference_stats(draft[:, tail], target[tail])
    for name, expected in ref.items():
        got = getattr(out, name)
        assert_close(name, got[..., tail], expected)


@pytest.mark.gpu
@needs_gpu
def test_torch_compile_fullgraph():
    g = _gen(21)
    draft = make_logits((4, 2, 3, 1023), "normal", dtype=torch.bfloat16, generator=g).cuda()
    target = make_logits((2, 3, 1023), "normal", dtype=torch.bfloat16, generator=g).cuda()

    def fn(d, t):
        u = ek.draft_uncertainty(d, t, temperature=0.8, backend="triton")
        return u.eu, u.jsd, u.kl

    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(draft, target)
    ref = reference_stats(draft, target, temperature=0.8)
    for name, value in zip(("eu", "jsd", "kl"), got):
        assert_close(name, value, ref[name])
