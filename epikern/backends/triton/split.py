"""Split-vocabulary kernels of ``draft_uncertainty`` (few rows, e.g. decode with N ≤ 128).

Each row's vocabulary is cut into ``C`` chunks of ``CHUNK_V`` entries (a multiple of ``BLOCK_V``):

1. :func:`split_states_kernel`, grid ``(N·C,)``: the online-softmax states of chunk ``(n, ch)``
   go to a workspace ``WS_D [N, C, 4, K_PAD]`` (m, s, t, c per draft) and ``WS_T [N, C, 4]``
   (m, s, t, unused for the target).
2. :func:`split_mixture_kernel` (only when decomposing), grid ``(N·C,)`` walked in reverse order
   of step 1 so the most recently read chunks (still in L2) come first: every program merges its
   row's states (same fixed order everywhere) to get ``lse_k``, ``lse_p``, then sums the mixture
   terms of its chunk into ``WS_M [N, C, 4]`` (jsd, H(q̄), kl, unused).
3. :func:`split_finalize_kernel`, grid ``(N,)``: merges the states again and sums ``WS_M`` over
   the chunks, in a fixed order, and writes the outputs.

No atomics and a fixed reduction order: results are deterministic. Workspace: O(N·C·K) floats.
"""

import triton
import triton.language as tl

from ._online import (finish_states, fold_states, merge_states, store_row, sweep_mixture,
                      sweep_states)


@triton.jit
def split_states_kernel(
    D, T, WS_D, WS_T,
    V, K, C, CHUNK_V, stride_dk, stride_dn, stride_tn, inv_temp,
    K_PAD: tl.constexpr, BLOCK_V: tl.constexpr, HAS_TARGET: tl.constexpr,
):
    """Step 1: partial online-softmax states of one (row, chunk)."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // C
    lo = (pid % C) * CHUNK_V
    hi = tl.minimum(lo + CHUNK_V, V)
    k = tl.arange(0, K_PAD)
    kmask = k < K
    m, s, t, c, mp, sp, tp = sweep_states(D + n * stride_dn, T + n * stride_tn, k, kmask,
                                          stride_dk, lo, hi, inv_temp, K_PAD, BLOCK_V, HAS_TARGET)

    ws = WS_D + pid * (4 * K_PAD) + k
    tl.store(ws, m)
    tl.store(ws + K_PAD, s)
    tl.store(ws + 2 * K_PAD, t)
    tl.store(ws + 3 * K_PAD, c)
    if HAS_TARGET:
        one = tl.arange(0, 1)
        wt = WS_T + pid * 4 + one
        tl.store(wt, mp)
        tl.store(wt + 1, sp)
        tl.store(wt + 2, tp)


@triton.jit
def _merged_row(WS_D, WS_T, n, C, K_PAD: tl.constexpr, CHUNK_BLOCK: tl.constexpr,
                HAS_TARGET: tl.constexpr):
    """States of row ``n`` merged over its ``C`` chunks, ``CHUNK_BLOCK`` at a time (fixed order)."""
    k = tl.arange(0, K_PAD)
    cb = tl.arange(0, CHUNK_BLOCK)
    m = tl.full([K_PAD], float("-inf"), tl.float32)
    s = tl.zeros([K_PAD], tl.float32)
    t = tl.zeros([K_PAD], tl.float32)
    c = tl.zeros([K_PAD], tl.float32)
    mp = tl.full([1], float("-inf"), tl.float32)
    sp = tl.zeros([1], tl.float32)
    tp = tl.zeros([1], tl.float32)
    for c0 in range(0, C, CHUNK_BLOCK):
        ch = c0 + cb
        cmask = (ch < C)[:, None]
        slot = n * C + ch.to(tl.int64)
        ws = WS_D + (slot * (4 * K_PAD))[:, None] + k[None, :]
        m_b = tl.load(ws, mask=cmask, other=float("-inf"))
        s_b = tl.load(ws + K_PAD, mask=cmask, other=0.0)
        t_b = tl.load(ws + 2 * K_PAD, mask=cmask, other=0.0)
        c_b = tl.load(ws + 3 * K_PAD, mask=cmask, other=0.0)
        m_b, s_b, t_b, c_b = fold_states(m_b, s_b, t_b, c_b, HAS_TARGET)
        m, s, t, c = merge_states(m, s, t, c, m_b, s_b, t_b, c_b, HAS_TARGET)
        if HAS_TARGET:
            wt = WS_T + (slot * 4)[:, None] + tl.arange(0, 1)[None, :]
            mp_b = tl.load(wt, mask=cmask, other=float("-inf"))
            sp_b = tl.load(wt + 1, mask=cmask, other=0.0)
            tp_b = tl.load(wt + 2, mask=cmask, other=0.0)
            mp_b, sp_b, tp_b, _ = fold_states(mp_b, sp_b, tp_b, tp_b, False)
            mp, sp, tp, _ = merge_states(mp, sp, tp, tp, mp_b, sp_b, tp_b, tp_b, False)
    return m, s, t, c, mp, sp, tp


@triton.jit
def split_mixture_kernel(
    D, T, W, WS_D, WS_T, WS_M,
    N, V, K, C, CHUNK_V, stride_dk, stride_dn, stride_tn, inv_temp,
    K_PAD: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK_BLOCK: tl.constexpr,
    HAS_TARGET: tl.constexpr,
):
    """Step 2: mixture terms (jsd, H(q̄), kl) of one (row, chunk), in reverse program order."""
    pid = N * C - 1 - tl.program_id(0).to(tl.int64)
    n = pid // C
    lo = (pid % C) * CHUNK_V
    hi = tl.minimum(lo + CHUNK_V, V)
    k = tl.arange(0, K_PAD)
    kmask = k < K
    m, s, t, c, mp, sp, tp = _merged_row(WS_D, WS_T, n, C, K_PAD, CHUNK_BLOCK, HAS_TARGET)
    w = tl.load(W + k, mask=kmask, other=0.0)
    _, _, _, lse, lse_p = finish_states(m, s, t, c, w, mp, sp, tp, HAS_TARGET)
    jsd, ent, kl = sweep_mixture(D + n * stride_dn, T + n * stride_tn, k, kmask, stride_dk, lo, hi,
                                 inv_temp, lse, w, lse_p, BLOCK_V, HAS_TARGET)
    wm = WS_M + pid * 4
    tl.store(wm, jsd)
    tl.store(wm + 1, ent)
    tl.store(wm + 2, kl)

@triton.jit
def split_finalize_kernel(
    W, WS_D, WS_T, WS_M, STATS, DLSE, TLSE,
    N, K, C,
    K_PAD: tl.constexpr, CHUNK_BLOCK: tl.constexpr,
    HAS_TARGET: tl.constexpr, DECOMPOSE: tl.constexpr,
):
    """Step 3, grid ``(N,)``: merge a row's chunks and write its outputs."""
    n = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, K_PAD)
    kmask = k < K
    m, s, t, c, mp, sp, tp = _merged_row(WS_D, WS_T, n, C, K_PAD, CHUNK_BLOCK, HAS_TARGET)
    w = tl.load(W + k, mask=kmask, other=0.0)
    eu, draft_entropy, target_entropy, lse, lse_p = finish_states(
        m, s, t, c, w, mp, sp, tp, HAS_TARGET)
    if DECOMPOSE:
        cb = tl.arange(0, CHUNK_BLOCK)
        acc_jsd = tl.zeros([CHUNK_BLOCK], tl.float32)
        acc_ent = tl.zeros([CHUNK_BLOCK], tl.float32)
        acc_kl = tl.zeros([CHUNK_BLOCK], tl.float32)
        for c0 in range(0, C, CHUNK_BLOCK):
            ch = c0 + cb
            cmask = ch < C
            wm = WS_M + (n * C + ch.to(tl.int64)) * 4
            acc_jsd += tl.load(wm, mask=cmask, other=0.0)
            acc_ent += tl.load(wm + 1, mask=cmask, other=0.0)
            acc_kl += tl.load(wm + 2, mask=cmask, other=0.0)
        jsd = tl.sum(acc_jsd, axis=0)
        mixture_entropy = tl.sum(acc_ent, axis=0)
        if HAS_TARGET:
            kl = tl.sum(acc_kl, axis=0)
        else:
            kl = float("nan")
    else:
        jsd = float("nan")
        kl = float("nan")
        mixture_entropy = float("nan")
    store_row(STATS, DLSE, TLSE, n, N, k, kmask, eu, jsd, kl, draft_entropy, mixture_entropy,
              target_entropy, lse, lse_p)
