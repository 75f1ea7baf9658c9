"""``ek.draft_uncertainty_rows`` on engine layouts against the dense op and the float64 reference.

Layouts (tests/_layouts.py): vLLM V1 (request-major target rows with bonus rows, int32
``target_logits_indices``), vLLM V2 (drafts ``[K, max_reqs, γ, V]`` by slot, int64 maps), SGLang
(``[B · draft_token_num, V]``), each with padding rows; odd vocabularies; fp32/fp16/bf16.
"""

from __future__ import annotations

import pytest
import torch

import epikern as ek
from epikern.backends import contract, entry, reference
from epikern.ops.draft_uncertainty import draft_uncertainty_flops
from tests._cases import assert_close
from tests._layouts import LAYOUTS, assert_rows_match, dense_expected, make_layout

CPU_BACKENDS = ["torch", "cpu"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _temperatures(n: int, seed: int = 1) -> torch.Tensor:
    return 0.5 + 1.5 * torch.rand(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts_match_the_dense_op(backend, layout, dtype):
    lay = make_layout(layout, K=3, V=301, dtype=dtype, seed=LAYOUTS.index(layout))
    temperature = _temperatures(lay.n)
    out = ek.draft_uncertainty_rows(lay.draft, lay.target, draft_rows=lay.draft_rows, target_rows=lay.target_rows,
                                    temperature=temperature, weights=[0.2, 0.3, 0.5], backend=backend)
    expected, keep = dense_expected(lay, 1 / temperature, backend, weights=[0.2, 0.3, 0.5])
    assert 0 < int(keep.sum()) < lay.n or layout == "sglang"
    assert_rows_match(out, expected, keep)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("decompose", [True, False])
def test_cpu_kernel_against_the_float64_reference(layout, decompose):
    lay = make_layout(layout, K=4, V=1001, dtype=torch.float16, seed=3)
    t = _temperatures(lay.n, seed=2)
    out = ek.draft_uncertainty_rows(lay.draft, lay.target, draft_rows=lay.draft_rows, target_rows=lay.target_rows,
                                    temperature=t, decompose=decompose, backend="cpu")
    K, V = lay.draft.shape[0], lay.draft.shape[-1]
    rows = contract.OutputRows(lay.draft_rows, lay.target_rows, (1 / t).float())
    ref = reference.draft_uncertainty_rows(lay.draft.reshape(K, -1, V), lay.target.reshape(-1, V), rows,
                                           torch.full((K,), 0.25, dtype=torch.float64), decompose)
    got = torch.cat([torch.stack(out[:6]), out.draft_lse, out.target_lse[None]])
    assert_close("packed", got, ref)


def test_split_vocabulary_path_with_padding():
    """Few rows over a large vocabulary take the CPU kernel's split path (N < 8, V ≥ 32768)."""
    lay = make_layout("sglang_padded", K=2, V=33001, dtype=torch.bfloat16, seed=5)
    lay.draft, lay.target = lay.draft[:, :6], lay.target[:6]
    lay.target_rows = torch.tensor([5, -1, 0, 3, 2, 4])
    out = ek.draft_uncertainty_rows(lay.draft, lay.target, target_rows=lay.target_rows, backend="cpu")
    expected, keep = dense_expected(lay, torch.ones(6), "cpu")
    assert_rows_match(out, expected, keep)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scalar_temperature_identity_maps_equal_the_dense_op(backend):
    g = torch.Generator().manual_seed(4)
    d, t = torch.randn(3, 2, 5, 77, generator=g), torch.randn(2, 5, 77, generator=g)
    out = ek.draft_uncertainty_rows(d, t, temperature=0.7, backend=backend)
    dense = ek.draft_uncertainty(d, t, temperature=0.7, backend=backend)
    for name in out._fields:
        assert_close(name, getattr(out, name), getattr(dense, name).reshape(getattr(out, name).shape), 1e-5, 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_draft_only_and_bad_temperatures(backend):
    """Without a target the target fields are NaN; a row whose T is not finite and > 0 is NaN."""
    lay = make_layout("sglang", K=2, V=64, dtype=torch.float32)
    t = torch.ones(lay.n)
    t[[1, 4, 6, 9]] = torch.tensor([0.0, -1.0, float("inf"), float("nan")])
    out = ek.draft_uncertainty_rows(lay.draft, None, temperature=t, backend=backend)
    keep = t.isfinite() & (t > 0)
    dense = ek.draft_uncertainty(lay.draft[:, keep], None, backend=backend)
    for name in ("jsd", "draft_entropy", "mixture_entropy", "draft_lse"):
        assert_close(name, getattr(out, name)[..., keep], getattr(dense, name))
        assert bool(getattr(out, name)[..., ~keep].isnan().all())
    assert bool(out.eu.isnan().all() and out.kl.isnan().all() and out.target_lse.isnan().all())


# --- out= --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_is_written_in_full_and_returned_as_views(backend):
    lay = make_layout("vllm_v1", K=3, V=129, dtype=torch.float32)
    n = lay.n
    buf = torch.full((7 + 3, n + 5), 7.0)  # a persistent buffer; this call uses its first n columns
    out = ek.draft_uncertainty_rows(lay.draft, lay.target, target_rows=lay.target_rows, out=buf[:, :n], backend=backend)
    assert out.eu.data_ptr() == buf.data_ptr() and out.draft_lse.data_ptr() == buf[6].data_ptr()
    assert out.target_lse.data_ptr() == buf[9].data_ptr()
    fresh = ek.draft_uncertainty_rows(lay.draft, lay.target, target_rows=lay.target_rows, backend=backend)
    assert torch.equal(buf[:, :n].isnan(), torch.cat([torch.stack(fresh[:6]), fresh.draft_lse, fresh.target_lse[None]]).isnan())
    assert bool((buf[:, n:] == 7.0).all()), "columns past N are not touched"
    for name in out._fields:
        assert_close(name, getattr(out, name), getattr(fresh, name), 0, 0)


def test_out_errors():
    lay = make_layout("sglang", K=2, V=64, dtype=torch.float32)
    n = lay.n

    def call(out, target=lay.target):
        return ek.draft_uncertainty_rows(lay.draft, target, out=out)

    with pytest.raises(TypeError, match=r"out must be float32, got torch.float16"):
        call(torch.empty(9, n, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"out must have shape \[7 \+ K, N\] = \[9, 12\], got \(9, 11\)"):
        call(torch.empty(9, n - 1))
    with pytest.raises(ValueError, match=r"out needs unit stride over N"):
        call(torch.empty(9, 2 * n)[:, ::2])
    shared = torch.empty(n * 64 + 9 * n)
    target = shared[: n * 64].view(n, 64).copy_(lay.target)
    with pytest.raises(ValueError, match=r"out shares memory with target_logits"):
        call(shared[n * 64 - 5:][: 9 * n].view(9, n), target)
    disjoint = call(shared[n * 64:].view(9, n), target)  # same storage, no overlap: allowed
    assert_close("eu", disjoint.eu, call(None).eu, 0, 0)


# --- bad maps ----------------------------------------------------------------------------------------

def test_bad_maps():
    lay = make_layout("vllm_v1", K=2, V=50, dtype=torch.float32)

    def call(**kw):
        args = dict(target_rows=lay.target_rows)
        args.update(kw)
        return ek.draft_uncertainty_rows(lay.draft, lay.target, backend="cpu", **args)

    rows = lay.target_rows.clone()
    rows[2] = 40
    with pytest.raises(ValueError, match=r"target_rows has entry 40, out of range for the 13 rows of target_logits"):
        call(target_rows=rows)
    with pytest.raises(ValueError, match=r"draft_rows has entry 12, out of range for the 12 rows of draft_logits"):
        call(draft_rows=torch.arange(12) + 1)
    with pytest.raises(TypeError, match=r"target_rows must be int32 or int64, got torch.float32"):
        call(target_rows=lay.target_rows.float())
    with pytest.raises(TypeError, match=r"draft_rows must be int32 or int64, got torch.int16"):
        call(draft_rows=torch.arange(12, dtype=torch.int16))
    with pytest.raises(TypeError, match=r"draft_rows must be a torch.Tensor"):
        call(draft_rows=list(range(12)))
    with pytest.raises(ValueError, match=r"all tensors must be on one device, got .*target_rows on meta"):
        call(target_rows=lay.target_rows.to("meta"))
    with pytest.raises(ValueError, match=r"target_rows must be 1-D \[N\], got shape \(3, 4\)"):
        call(target_rows=lay.target_rows.reshape(3, 4))
    with pytest.raises(ValueError, match=r"the row maps differ in length"):
        call(draft_rows=torch.arange(11))
    with pytest.raises(ValueError, match=r"target_logits has 13 rows but there are 12 output rows; pass target_rows="):
        call(target_rows=None)
    with pytest.raises(ValueError, match=r"a temperature tensor must have shape \[12\]"):
        call(temperature=torch.ones(3))
    with pytest.raises(TypeError, match=r"temperature must be a float or a floating tensor"):
        call(temperature=torch.ones(12, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match=r"target_rows was given without target_logits"):
        ek.draft_uncertainty_rows(lay.draft, None, target_rows=lay.target_rows)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernels_skip_out_of_range_entries(backend):
    """On an accelerator the maps are not checked (it would synchronise): the backends write NaN."""
    lay = make_layout("sglang", K=2, V=40, dtype=torch.float32)
    draft, target = lay.draft, lay.target
    n = lay.n
    maps = torch.arange(n, dtype=torch.int32)
    maps[[0, 5]] = torch.tensor([n, 10**6], dtype=torch.int32)
    out = torch.empty(9, n)
    rows = contract.OutputRows(maps, maps.long(), torch.ones(n))
    entry("draft_uncertainty_rows", backend)(draft, target, rows, torch.full((2,), 0.5), True, out)
    assert bool(out[:, [0, 5]].isnan().all()) and not bool(out[:, 1].isnan().any())


# --- torch.library contract ---------------------------------------------------------------------------

def _op_args(backend: str, with_target: bool = True):
    lay = make_layout("vllm_v2", K=3, V=70, dtype=torch.float32)
    rows = lay.draft_rows.clone()
    rows[rows < 0] = 0  # no NaN rows: opcheck compares eager and traced outputs
    t_rows = lay.target_rows.clone()
    t_rows[t_rows < 0] = 1
    draft = lay.draft.reshape(3, -1, 70)
    return (draft, lay.target if with_target else None, rows, t_rows, torch.tensor([0.2, 0.3, 0.5]),
            1 / _temperatures(rows.shape[0]), True, backend, torch.empty(10, rows.shape[0]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    torch.library.opcheck(torch.ops.epikern.draft_uncertainty_rows.default, _op_args(backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph(backend):
    lay = make_layout("vllm_v2", K=3, V=70, dtype=torch.float16)
    t = _temperatures(lay.n)

    def fn(d, tg, dr, tr, t):
        u = ek.draft_uncertainty_rows(d, tg, draft_rows=dr, target_rows=tr, temperature=t, backend=backend)
        return u.eu * 2 + u.jsd

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    args = (lay.draft, lay.target, lay.draft_rows, lay.target_rows, t)
    assert_close("compiled", compiled(*args), fn(*args), 1e-6, 1e-6)


def test_flop_counter_counts_the_output_rows():
    from epikern.eval.cost import count_flops

    lay = make_layout("vllm_v1", K=3, V=70, dtype=torch.float32)
    _, total, per_op = count_flops(ek.draft_uncertainty_rows, lay.draft, lay.target, target_rows=lay.target_rows)
    assert per_op == {"epikern.draft_uncertainty_rows": draft_uncertainty_flops(3, lay.n, 70, True, True)}
    assert total == per_op["epikern.draft_uncertainty_rows"]


def test_fake_tensors_and_empty_maps():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        d, t = torch.empty(2, 6, 4, 100, dtype=torch.bfloat16), torch.empty(30, 100)
        u = ek.draft_uncertainty_rows(d, t, draft_rows=torch.zeros(9, dtype=torch.int32),
                                      target_rows=torch.zeros(9, dtype=torch.int32))
        assert u.eu.shape == (9,) and u.draft_lse.shape == (2, 9)
    empty = ek.draft_uncertainty_rows(torch.randn(2, 3, 10), torch.randn(3, 10),
                                      target_rows=torch.empty(0, dtype=torch.int64), draft_rows=torch.empty(0, dtype=torch.int64))
    assert empty.eu.shape == (0,) and empty.draft_lse.shape == (2, 0)


# --- the examples of docs/engines.md --------------------------------------------------------------

def test_docs_custom_decoder_example():
    g = torch.Generator().manual_seed(9)
    K, B, gamma, V, dev = 3, 2, 4, 90, "cpu"
    draft_logits = torch.randn(K, B, gamma, V, generator=g)
    target_logits = torch.randn(B, gamma + 1, V, generator=g)
    j = torch.arange(gamma, device=dev)
    b = torch.arange(B, device=dev)[:, None]
    target_rows = (b * (gamma + 1) + j).reshape(-1)
    u = ek.draft_uncertainty_rows(draft_logits, target_logits, target_rows=target_rows)
    eu = u.eu.view(B, gamma)
    assert_close("eu", eu, ek.draft_uncertainty(draft_logits, target_logits[:, :gamma]).eu)


def test_docs_sglang_example():
    g = torch.Generator().manual_seed(10)
    K, B, dtn, V, dev = 2, 3, 5, 70, "cpu"
    draft_logits = torch.randn(K, B, dtn - 1, V, generator=g)
    next_token_logits = torch.randn(B * dtn, V, generator=g)
    j = torch.arange(dtn, device=dev)
    draft_rows = torch.where(j < dtn - 1, torch.arange(B, device=dev)[:, None] * (dtn - 1) + j, -1).reshape(-1)
    u = ek.draft_uncertainty_rows(draft_logits, next_token_logits, draft_rows=draft_rows)
    eu = u.eu.view(B, dtn)
    dense = ek.draft_uncertainty(draft_logits, next_token_logits.view(B, dtn, V)[:, :-1]).eu
    assert_close("eu", eu[:, :-1], dense)
    assert bool(eu[:, -1].isnan().all())
