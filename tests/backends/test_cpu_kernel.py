"""Kernel-level tests of ``epikern._cpu``: the shared header math and fast-math routines (through
the module's ``_test_*`` hooks), the work counters, thread-count determinism, strides and int64
offsets, and the kernel paths the design §8 matrix does not reach: jumps of the max, the split
vocabulary, and sweep 2 with the exponentials of sweep 1 kept or recomputed (forced with
``keep_bytes``) for K ∈ {1, 2, 4, 7, 8, 9, 12}. Every test runs once per ISA variant of the module
that this CPU supports (baseline, avx2, avx512 on x86-64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import epikern as ek
from epikern.backends import cpu
from tests._cases import (assert_close_stats, assert_special_rows, make_logits, reference_stats,
                          special_rows)

_cpu = pytest.importorskip("epikern._cpu", reason="epikern._cpu is not built (pip install -e .)")

FLT_MIN = np.float32(1.17549435e-38)

pytestmark = pytest.mark.usefixtures("cpu_isa")  # every test once per ISA variant (conftest.py)


KEEP = {"kept": 1 << 40, "recomputed": 0}  # keep_bytes that force each sweep-2 path


def _raw(draft, target, weights=None, temperature=1.0, decompose=True, num_threads=None, out=None,
         keep_bytes=-1):
    """Run the kernel through the raw entry; returns (stats, draft_lse, target_lse, KernelWork)."""
    K, N, _ = draft.shape
    w = torch.full((K,), 1.0 / K) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    stats, draft_lse, target_lse = out if out is not None else (
        torch.empty(6, N), torch.empty(K, N), torch.empty(N))
    work = cpu.draft_uncertainty_raw(draft, target, w, temperature, decompose, stats, draft_lse,
                                     target_lse, num_threads=num_threads, keep_bytes=keep_bytes)
    return stats, draft_lse, target_lse, work


def _result(stats, draft_lse, target_lse, *_):
    return ek.DraftUncertainty(*stats.unbind(0), draft_lse=draft_lse, target_lse=target_lse)


# ---- fast math ----------------------------------------------------------------------------------

def test_fast_exp_accuracy_and_specials():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.uniform(-87.3, 88.37, 200_000), rng.uniform(-1, 1, 50_000), rng.normal(0, 1e-4, 1000),
        np.linspace(-87.33, -80, 1000), np.linspace(88.0, 88.37, 1000),
        [0.0, -0.0, 1.0, -1.0, math.log(2), 88.37, -87.33],
    ]).astype(np.float32)
    out = _cpu._test_exp(x).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    rel = np.abs(out - ref) / ref
    assert rel.max() < 4e-7, f"max relative error {rel.max():.3g} at x={x[rel.argmax()]!r}"

    specials = np.array([-np.inf, np.inf, np.nan, -1e30, -104.0, -88.0, 88.4, 89.0, 1e30],
                        dtype=np.float32)
    got = _cpu._test_exp(specials)
    assert got[0] == 0.0 and got[1] == np.inf and np.isnan(got[2])
    assert got[3] == 0.0 and got[4] == 0.0  # underflow (results below FLT_MIN flush to 0)
    assert 0.0 <= got[5] < 2 * FLT_MIN
    assert (got[6:] == np.inf).all()  # saturates above 127.5·ln2 (documented)


def test_simd_exp2_accuracy_and_specials():
    """simd::exp2, the exponential of draft_uncertainty's sweeps (base 2; valid for x < 127.5)."""
    rng = np.random.default_rng(2)
    x = np.concatenate([
        rng.uniform(-126, 127.49, 200_000), rng.uniform(-1, 1, 50_000), rng.normal(0, 1e-4, 1000),
        rng.uniform(-30, 0, 50_000), np.linspace(-126, -120, 1000), np.linspace(127, 127.49, 1000),
        [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 127.0, -126.0],
    ]).astype(np.float32)
    out = _cpu._test_simd_exp2(x).astype(np.float64)
    ref = np.exp2(x.astype(np.float64))
    rel = np.abs(out - ref) / ref
    assert rel.max() < 4e-7, f"max relative error {rel.max():.3g} at x={x[rel.argmax()]!r}"
    assert _cpu._test_simd_exp2(np.array([0, 1, 5, -3], np.float32)).tolist() == [1, 2, 32, 0.125]
    # below −127.5 the result is exactly 0 (the sweeps clamp −inf to −150 and need e = 0 there)
    got = _cpu._test_simd_exp2(np.array([-127.6, -150.0, -1e4, np.nan], dtype=np.float32))
    assert (got[:3] == 0.0).all() and np.isnan(got[3])


def test_simd_log2_accuracy_on_normal_floats():
    """simd::log2 (sweep 2 takes log2 q̄, q̄ ∈ (0, 1]) over the whole normal range; finite at 0."""
    rng = np.random.default_rng(1)
    x = np.concatenate([
        np.exp(rng.uniform(-87, 88, 200_000)), rng.uniform(1e-6, 1.0, 50_000),
        rng.uniform(1.0, 64.0, 50_000), 1.0 + rng.normal(0, 1e-5, 1000),
        np.array([FLT_MIN, np.finfo(np.float32).max, 1.0, 2.0, 0.70710677, 0.7071068]),
    ]).astype(np.float32)
    out = _cpu._test_simd_log2(x).astype(np.float64)
    ref = np.log2(x.astype(np.float64))
    err = np.abs(out - ref)
    bound = 1.5e-7 * np.abs(ref) + 1.8e-7
    bad = err > bound
    assert not bad.any(), f"log2({x[bad][0]!r}) = {out[bad][0]!r}, expected {ref[bad][0]!r}"
    assert _cpu._test_simd_log2(np.array([1.0, 2.0, 0.25], dtype=np.float32)).tolist() == [0, 1, -2]
    zero = _cpu._test_simd_log2(np.array([0.0, 1e-40], dtype=np.float32))  # q̄ = 0 or denormal
    assert np.isfinite(zero).all() and (zero < -125).all()


def test_half_to_float_is_exact_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint16)
    out = _cpu._test_half_to_float(bits)
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.uint32), ref[~nan].view(np.uint32))  # signed zeros too


def test_bf16_to_float_matches_torch():
    bits = np.arange(1 << 16, dtype=np.uint16)
    out = _cpu._test_bf16_to_float(bits)
    ref = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.uint32), ref[~nan].view(np.uint32))


# ---- shared header: online-softmax state and merge ----------------------------------------------

def _state_ref(x: np.ndarray, y: np.ndarray):
    """float64 lse, entropy and Σ q (x − y) of softmax(x)."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    m = x.max()
    e = np.exp(x - m)
    s = e.sum()
    q = e / s
    keep = q > 0
    lse = m + math.log(s)
    ent = -(q[keep] * (x[keep] - lse)).sum()
    cross = (q[keep] * (x[keep] - y[keep])).sum()
    return lse, ent, cross


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_softmax_merge_matches_one_shot_and_float64(chunk):
    rng = np.random.default_rng(chunk)
    x = (rng.normal(0, 3, 1000) + np.linspace(-20, 20, 1000)).astype(np.float32)
    x[rng.random(1000) < 0.2] = -np.inf
    y = rng.normal(0, 3, 1000).astype(np.float32)
    lse_y = float(np.logaddexp.reduce(y.astype(np.float64)))
    m, s, t, c, lse, ent, kl = _cpu._test_softmax_chunks(x, y, chunk, lse_y)
    one = _cpu._test_softmax_chunks(x, y, len(x), lse_y)
    np.testing.assert_allclose([lse, ent, kl], one[4:], rtol=1e-5, atol=1e-5)
    ref_lse, ref_ent, ref_cross = _state_ref(x, y)
    np.testing.assert_allclose([lse, ent, kl], [ref_lse, ref_ent, ref_cross - ref_lse + lse_y],
                               rtol=1e-5, atol=1e-5)
    assert m == x.max()


def test_softmax_state_edge_rows():
    y = np.zeros(5, dtype=np.float32)
    all_masked = np.full(5, -np.inf, dtype=np.float32)
    m, s, t, c, lse, ent, kl = _cpu._test_softmax_chunks(all_masked, y, 2, 0.0)
    assert lse == -np.inf and s == 0.0 and np.isnan(ent)
    with_nan = np.array([0.0, 1.0, np.nan, -np.inf, 2.0], dtype=np.float32)
    out = _cpu._test_softmax_chunks(with_nan, y, 2, 0.0)
    assert np.isnan(out[4]) and np.isnan(out[5])
    nan_after_masked = np.array([-np.inf, -np.inf, np.nan, 1.0], dtype=np.float32)
    assert np.isnan(_cpu._test_softmax_chunks(nan_after_masked, y[:4], 1, 0.0)[4])
    # +inf cross term: mass where the reference has y = -inf
    y_masked = np.array([0.0, -np.inf, 0.0, 0.0, 0.0], dtype=np.float32)
    assert _cpu._test_softmax_chunks(np.zeros(5, np.float32), y_masked, 2, 1.0)[6] == np.inf


@pytest.mark.parametrize("has_p", [True, False])
def test_mixture_terms_match_float64(has_p):
    rng = np.random.default_rng(3)
    K, V = 5, 400
    w = np.array([0.1, 0.0, 0.3, 0.4, 0.2])
    z = rng.normal(0, 2, (K, V))
    z[rng.random((K, V)) < 0.2] = -np.inf
    z[:, 0] = -np.inf  # no draft has mass on entry 0
    log_q = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        log_w = np.log(w)
    l = log_w[:, None] + log_q
    y = rng.normal(0, 2, V)
    y[5] = -np.inf
    lse_p = float(np.logaddexp.reduce(y))
    out = _cpu._test_mixture_terms(l.astype(np.float32), log_w.astype(np.float32),
                                   y.astype(np.float32), lse_p, has_p).astype(np.float64)
    log_qbar = np.logaddexp.reduce(l, axis=0)
    qbar = np.exp(log_qbar)
    with np.errstate(invalid="ignore"):
        jsd = np.where(np.exp(l) > 0, np.exp(l) * (log_q - log_qbar), 0).sum(0)
        ent = np.where(qbar > 0, -qbar * log_qbar, 0)
        kl = np.where(qbar > 0, qbar * (log_qbar - y + lse_p), 0) if has_p else np.zeros(V)
    for got, ref in zip(out, (jsd, ent, kl)):
        inf = np.isinf(ref)
        assert np.array_equal(np.isinf(got), inf) and not np.isnan(got).any()
        np.testing.assert_allclose(got[~inf], ref[~inf], rtol=1e-5, atol=1e-6)


def test_mixture_kl_is_inf_where_qbar_underflows_against_a_masked_reference():
    # log q̄ = −120 is a positive probability (e^{−120} underflows in fp32): against y = −inf the
    # kl term is +inf, as in float64, never the 0 that q̄ = 0 would give
    l = np.array([[-120.0, 0.0], [-125.0, -1.0]], np.float32)
    log_w = np.log(np.array([0.5, 0.5], np.float32))
    y = np.array([-np.inf, 0.0], np.float32)
    jsd, ent, kl = _cpu._test_mixture_terms(l, log_w, y, 0.0, True)
    assert kl[0] == np.inf and np.isfinite(kl[1]) and not np.isnan(jsd).any() and not np.isnan(ent).any()


# ---- the kernel ---------------------------------------------------------------------------------

@pytest.mark.parametrize("decompose", [False, True])
@pytest.mark.parametrize("has_target", [True, False])
def test_reads_each_logit_once_per_sweep(decompose, has_target):
    K, N, V = 3, 5, 5000
    g = torch.Generator().manual_seed(0)
    draft = make_logits((K, N, V), "peaked", generator=g)
    target = make_logits((N, V), "peaked", generator=g) if has_target else None
    *_, (read, _, _) = _raw(draft, target, decompose=decompose)
    per_sweep = K * N * V + (N * V if has_target else 0)
    assert read == per_sweep * (2 if decompose else 1)


def test_thread_count_does_not_change_results():
    g = torch.Generator().manual_seed(1)
    draft = make_logits((4, 13, 3001), "masked", generator=g)
    target = make_logits((13, 3001), "normal", generator=g)
    runs = [_raw(draft, target, num_threads=t)[:3] for t in (1, 2, 3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


def test_arbitrary_strides_of_inputs_and_outputs():
    g = torch.Generator().manual_seed(2)
    K, N, V = 3, 6, 777
    # drafts stored [N, K, V] (stride_k = V, stride_n = K·V), every other row of a padded buffer
    storage = make_logits((2 * N, K, V + 5), "normal", generator=g)
    draft = storage[::2, :, :V].permute(1, 0, 2)
    target = make_logits((N, 3 * V), "peaked", generator=g)[:, V:2 * V]
    assert not draft.is_contiguous() and not target.is_contiguous()
    out = (torch.empty(N, 6).t(), torch.empty(N, K).t(), torch.empty(N, 2)[:, 1])
    stats, draft_lse, target_lse, _ = _raw(draft, target, weights=[0.5, 0.2, 0.3], out=out)
    ref = reference_stats(draft, target, weights=[0.5, 0.2, 0.3])
    result = ek.DraftUncertainty(*stats.unbind(0), draft_lse=draft_lse, target_lse=target_lse)
    assert_close_stats(result, ref)


def test_int64_offsets_beyond_2_to_31_elements():
    """Row n = 1 starts 2^31 + 64 elements after row 0: int32 offsets would wrap. The buffer is
    mostly untouched virtual memory (only the two rows' pages are written)."""
    V, stride = 1000, (1 << 31) + 64
    try:
        buf = torch.empty(stride + V, dtype=torch.bfloat16)
    except RuntimeError as exc:  # pragma: no cover - depends on the machine's overcommit policy
        pytest.skip(f"cannot reserve 4 GiB of virtual memory: {exc}")
    g = torch.Generator().manual_seed(3)
    rows = make_logits((2, V), "normal", dtype=torch.bfloat16, generator=g)
    buf[:V] = rows[0]
    buf[stride:] = rows[1]
    target = buf.as_strided((2, V), (stride, 1))
    draft = buf.as_strided((1, 2, V), (0, stride, 1))
    stats, draft_lse, target_lse, _ = _raw(draft, target)
    ref = reference_stats(rows.unsqueeze(0), rows)
    assert_close_stats(ek.DraftUncertainty(*stats.unbind(0), draft_lse=draft_lse,
                                           target_lse=target_lse), ref)


@pytest.mark.parametrize("K", [9, 12])
def test_many_drafts_take_the_staged_sweep(K):
    g = torch.Generator().manual_seed(K)
    draft = make_logits((K, 4, 2500), "masked", generator=g)
    target = make_logits((4, 2500), "normal", generator=g)
    w = torch.rand(K, generator=g, dtype=torch.float64)
    w[1] = 0
    w = (w / w.sum()).tolist()
    out = ek.draft_uncertainty(draft, target, weights=w, temperature=0.7, backend="cpu")
    assert_close_stats(out, reference_stats(draft, target, weights=w, temperature=0.7))


def test_large_jumps_of_the_row_max():
    """The one-pass sweep restarts a block whose max rises > 16 above the running origin; rows
    whose first blocks are all -inf start late."""
    g = torch.Generator().manual_seed(4)
    V = 9000  # several 2048-entry blocks
    draft = make_logits((2, 3, V), "normal", generator=g)
    draft[0, 0, 5000:] += 200.0  # jump in the third block
    draft[1, 0, 2100:2200] += 20.0  # jump just above the restart threshold
    draft[0, 2, 7000:7010] += 12.0  # jump just below it (no restart)
    draft[0, 1, :4500] = float("-inf")  # two masked blocks first
    draft[1, 2] = torch.linspace(-300, 300, V)  # steadily rising max
    target = make_logits((3, V), "normal", generator=g)
    out = ek.draft_uncertainty(draft, target, backend="cpu")
    assert_close_stats(out, reference_stats(draft, target))


@pytest.mark.parametrize("has_target", [True, False])
def test_split_vocabulary_path_for_few_rows(has_target):
    """N < 8 rows and V ≥ 32768 run over (row, span of 16384) items; the merge of the span states
    must match the reference, with masked spans, a NaN row and a max that jumps between spans."""
    g = torch.Generator().manual_seed(5)
    K, N, V = 3, 5, 40000  # 3 spans, the last one short
    draft = make_logits((K, N, V), "masked", generator=g)
    draft[0, 1, :20000] = float("-inf")  # first span of a row fully masked
    draft[1, 2, 30000:] += 150.0  # max jumps in the last span
    draft[2, 3, 17] = float("nan")
    target = make_logits((N, V), "normal", generator=g) if has_target else None
    for decompose in (False, True):
        out = ek.draft_uncertainty(draft, target, weights=[0.2, 0.5, 0.3], decompose=decompose,
                                   backend="cpu")
        ref = reference_stats(draft, target, weights=[0.2, 0.5, 0.3], decompose=decompose)
        assert_close_stats(out, ref)
    *_, (read, _, _) = _raw(draft, target)
    assert read == 2 * (K + has_target) * N * V
    runs = [_raw(draft, target, num_threads=t)[:3] for t in (1, 2, 3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


# ---- sweep 2: exponentials of sweep 1 kept, or recomputed ---------------------------------------

def _weights(K, g):
    """Non-uniform weights with a zero (K ≥ 3): a draft the mixture sweep skips."""
    w = torch.rand(K, generator=g, dtype=torch.float64) + 0.05
    if K >= 3:
        w[1] = 0
    return (w / w.sum()).tolist()


@pytest.mark.parametrize("path", list(KEEP))
@pytest.mark.parametrize("K", [1, 2, 4, 7, 8, 9, 12])
def test_sweep2_paths_match_float64(K, path):
    """Row path (N ≥ 8), odd V over two sweep-1 blocks and a partial vector, masked drafts,
    peaked target, temperature ≠ 1; the work counters prove which path ran: kept = K + 1
    exponentials and one log per entry, recomputed = one more exponential per draft in the
    mixture."""
    g = torch.Generator().manual_seed(100 + K)
    N, V = 9, 2999
    draft = make_logits((K, N, V), "masked", generator=g)
    target = make_logits((N, V), "peaked", generator=g)
    w = _weights(K, g)
    out = _raw(draft, target, weights=w, temperature=0.7, keep_bytes=KEEP[path])
    assert_close_stats(_result(*out), reference_stats(draft, target, weights=w, temperature=0.7))
    work, mixed = out[3], sum(x > 0 for x in w)
    assert work.logs == N * V
    assert work.exps == (K + 1) * N * V + (0 if path == "kept" else mixed * N * V)
    assert work.read == (K + 1) * N * V + (mixed + 1) * N * V


@pytest.mark.parametrize("path", list(KEEP))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sweep2_paths_low_precision_and_strides(dtype, path):
    """fp16/bf16 drafts read through strides (stored [N, K, V], every other row) against an fp32
    reference slice, without and with a target."""
    g = torch.Generator().manual_seed(7)
    K, N, V = 4, 8, 2100
    draft = make_logits((2 * N, K, V + 3), "peaked", dtype=dtype, generator=g)[::2, :, :V].permute(1, 0, 2)
    target = make_logits((N, 2 * V), "normal", generator=g)[:, V:]
    assert not draft.is_contiguous() and not target.is_contiguous()
    for t in (target, None):
        out = _raw(draft, t, weights=[0.1, 0.4, 0.3, 0.2], keep_bytes=KEEP[path])
        assert_close_stats(_result(*out), reference_stats(draft, t, weights=[0.1, 0.4, 0.3, 0.2]))


@pytest.mark.parametrize("path", list(KEEP))
def test_sweep2_paths_special_rows(path):
    """+inf kl, one-hot drafts, a NaN logit and fully masked drafts (tests/_cases.special_rows),
    plus identical drafts (jsd = 0), on both paths."""
    draft, target = special_rows(V=2500)
    out = _result(*_raw(draft, target, keep_bytes=KEEP[path]))
    assert_close_stats(out, reference_stats(draft, target))
    assert_special_rows(out)
    g = torch.Generator().manual_seed(8)
    same = make_logits((1, 9, 2500), "peaked", generator=g).expand(3, 9, 2500)
    out = _result(*_raw(same, target[:1].expand(9, 2500), keep_bytes=KEEP[path]))
    assert out.jsd.abs().max() < 1e-5
    assert_close_stats(out, reference_stats(same, target[:1].expand(9, 2500)))


@pytest.mark.parametrize("path", list(KEEP))
@pytest.mark.parametrize("K", [3, 9])
def test_sweep2_paths_split_vocabulary(K, path):
    """Few rows split the vocabulary (3 spans, the last short): each thread keeps the
    exponentials of its own items across the barrier; thread count does not change results."""
    g = torch.Generator().manual_seed(9 + K)
    N, V = 3, 40000
    draft = make_logits((K, N, V), "masked", generator=g)
    draft[0, 1, :20000] = float("-inf")  # a fully masked first span
    draft[1, 2, 30000:] += 150.0  # the max jumps in the last span
    target = make_logits((N, V), "normal", generator=g)
    w = _weights(K, g)
    runs = [_raw(draft, target, weights=w, num_threads=t, keep_bytes=KEEP[path]) for t in (1, 2, 3)]
    assert_close_stats(_result(*runs[0]), reference_stats(draft, target, weights=w))
    for other in runs[1:]:
        for a, b in zip(runs[0][:3], other[:3]):
            assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())
    mixed = sum(x > 0 for x in w)
    redone = 2048  # the block where draft 1's max jumps by 150 is redone from its own max
    assert runs[0][3].exps == (K + 1) * N * V + redone + (0 if path == "kept" else mixed * N * V)


def test_default_budget_keeps_up_to_8_mib_of_exponentials():
    """keep_bytes = -1: one decode row over V = 128256 keeps 16 drafts' exponentials (8.2 MB) but
    not 17 (8.7 MB); both agree with the reference."""
    g = torch.Generator().manual_seed(10)
    V = 128256
    for K, kept in ((16, True), (17, False)):
        draft = make_logits((K, 1, V), "peaked", dtype=torch.bfloat16, generator=g)
        target = make_logits((1, V), "peaked", dtype=torch.bfloat16, generator=g)
        out = _raw(draft, target)
        assert_close_stats(_result(*out), reference_stats(draft, target))
        assert (out[3].exps < (2 * K + 1) * V) == kept
