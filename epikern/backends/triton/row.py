"""Row kernel of ``draft_uncertainty``: one program per row (many rows, e.g. prefill).

Sweep 1 reads the K draft rows and the target row once, in ``[K_PAD, BLOCK_V]`` tiles, keeping an
online-softmax state per distribution (:mod:`._online`). Sweep 2 (``DECOMPOSE``) re-reads the same
rows for the mixture terms, walking the blocks in reverse so that the most recently read (still in
L2) come first. Offsets are int64; any strides on K and N; unit stride on V.
"""

import triton
import triton.language as tl

from ._online import block_update, finish_states, load_target, load_tile, mixture_block, store_row


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

    m = tl.full([K_PAD], float("-inf"), tl.float32)
    s = tl.zeros([K_PAD], tl.float32)
    t = tl.zeros([K_PAD], tl.float32)
    c = tl.zeros([K_PAD], tl.float32)
    mp = tl.full([1], float("-inf"), tl.float32)
    sp = tl.zeros([1], tl.float32)
    tp = tl.zeros([1], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + v
        vmask = offs < V
        x = load_tile(d_row, k, kmask, stride_dk, offs, vmask, inv_temp)
        if HAS_TARGET:
            y = load_target(t_row, offs, vmask, inv_temp)[None, :]
            m, s, t, c = block_update(m, s, t, c, x, y, True)
            mp, sp, tp, _ = block_update(mp, sp, tp, tp, y, y, False)
        else:
            m, s, t, c = block_update(m, s, t, c, x, x, False)

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
