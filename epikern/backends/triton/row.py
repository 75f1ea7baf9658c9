"""Row kernel of ``draft_uncertainty``: one program per row (many rows, e.g. prefill).

Sweep 1 reads the K draft rows and the target row once, in ``[K_PAD, BLOCK_V]`` tiles, keeping an
online-softmax state per distribution (:mod:`._online`). Sweep 2 (``DECOMPOSE``) re-reads the same
rows for the mixture terms, walking the blocks in reverse so that the most recently read (still in
L2) come first. Offsets are int64; any strides on K and N; unit stride on V.
"""

import triton
import triton.language as tl

from ._online import (finish_states, load_target, load_tile, mixture_block, store_row,
                      sweep_states)


@triton.jit
def draft_uncertainty_row_kernel(
    D, T, W, STATS, DLSE, TLSE,
    N, V, K, stride_dk, stride_dn, stride_tn, inv_temp,
    K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_TARGET: tl.constexpr, DECOMPOSE: tl.constexpr,
):
    """Grid ``(N,)``. ``D``: drafts ``[K, N, V]``; ``T``: target ``[N, V]`` (any pointer when
    ``HAS_TARGET`` is false); ``W``: fp32 weights ``[K]``; outputs as in :func:`store_row`."""
    n = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, K_PAD)
    kmask = k < K
    v = tl.arange(0, BLOCK_V)
    d_row = D + n * stride_dn
    t_row = T + n * stride_tn
    m, s, t, c, mp, sp, tp = sweep_states(d_row, t_row, k, kmask, stride_dk, 0, V, inv_temp,
                                          K_PAD, BLOCK_V, HAS_TARGET)

    w = tl.load(W + k, mask=kmask, other=0.0)
    eu, draft_entropy, target_entropy, lse, lse_p = finish_states(
        m, s, t, c, w, mp, sp, tp, HAS_TARGET)

    if DECOMPOSE:
        lse_in = tl.where(kmask, lse, 0.0)
        log_w = tl.log(w)
        acc_jsd = tl.zeros([BLOCK_V], tl.float32)
        acc_ent = tl.zeros([BLOCK_V], tl.float32)
        acc_kl = tl.zeros([BLOCK_V], tl.float32)
        n_blocks = tl.cdiv(V, BLOCK_V)
        for i in range(0, n_blocks):
            offs = (n_blocks - 1 - i) * BLOCK_V + v
            vmask = offs < V
            x = load_tile(d_row, k, kmask, stride_dk, offs, vmask, inv_temp)
            if HAS_TARGET:
                y = load_target(t_row, offs, vmask, inv_temp)
            else:
                y = offs
            jsd_b, ent_b, kl_b = mixture_block(x, y, lse_in, log_w, lse_p, HAS_TARGET)
            acc_jsd += jsd_b
            acc_ent += ent_b
            acc_kl += kl_b
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
