"""Row kernel of ``draft_uncertainty``: one program per row (many rows, e.g. prefill).

Sweep 1 reads the K draft rows and the target row once, in ``[K_PAD, BLOCK_V]`` tiles, keeping an
online-softmax state per distribution (:func:`._online.sweep_states`). Sweep 2 (``DECOMPOSE``)
re-reads the same rows for the mixture terms (:func:`._online.sweep_mixture`), walking the blocks
in reverse so that the most recently read (still in L2) come first. Offsets are int64; any strides on K and N; unit stride on V.
"""

import triton
import triton.language as tl

from ._online import finish_states, store_row, sweep_mixture, sweep_states


@triton.jit
def row_results(d_row, t_row, W, k, kmask, stride_dk, V, inv_temp,
                K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
                HAS_TARGET: tl.constexpr, DECOMPOSE: tl.constexpr):
    """Both sweeps over one row: draft rows at ``d_row`` (``stride_dk`` apart), the target row at
    ``t_row``. Returns the arguments of :func:`store_row` after ``k, kmask``."""
    m, s, t, c, mp, sp, tp = sweep_states(d_row, t_row, k, kmask, stride_dk, 0, V, inv_temp,
                                          K_PAD, BLOCK_V, HAS_TARGET)

    w = tl.load(W + k, mask=kmask, other=0.0)
    eu, draft_entropy, target_entropy, lse, lse_p = finish_states(
        m, s, t, c, w, mp, sp, tp, HAS_TARGET)

    if DECOMPOSE:
        jsd, mixture_entropy, kl = sweep_mixture(d_row, t_row, k, kmask, stride_dk, 0, V, inv_temp,
                                                 lse, w, lse_p, BLOCK_V, HAS_TARGET)
        if not HAS_TARGET:
            kl = float("nan")
    else:
        jsd = float("nan")
        kl = float("nan")
        mixture_entropy = float("nan")
    return eu, jsd, kl, draft_entropy, mixture_entropy, target_entropy, lse, lse_p


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
    eu, jsd, kl, draft_entropy, mixture_entropy, target_entropy, lse, lse_p = row_results(
        D + n * stride_dn, T + n * stride_tn, W, k, kmask, stride_dk, V, inv_temp,
        K_PAD, BLOCK_V, HAS_TARGET, DECOMPOSE)
    store_row(STATS, DLSE, TLSE, n, N, k, kmask, eu, jsd, kl, draft_entropy, mixture_entropy,
              target_entropy, lse, lse_p)
