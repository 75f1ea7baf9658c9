"""Kernel of ``draft_uncertainty_rows``: the row kernel reading its rows through index maps.

One program per output row ``n``: draft row ``DMAP[n]`` of ``D [K, R_D, V]`` and target row
``TMAP[n]`` of ``T [R_T, V]`` (int32 or int64 maps, or the identity without ``HAS_*MAP``) at
``1/T = ITEMP[n · stride_it]``, written to column ``n`` of ``OUT [7 + K, ·]`` (rows ``stride_out``
elements apart). A map entry outside ``[0, R)`` or a ``1/T`` that is not finite and > 0 skips the
row: every output NaN, no logit read.
"""

import triton
import triton.language as tl

from ._online import store_row
from .row import row_results


@triton.jit
def draft_uncertainty_rows_kernel(
    D, T, DMAP, TMAP, ITEMP, W, OUT,
    R_D, R_T, V, K, stride_dk, stride_dn, stride_tn, stride_it, stride_out,
    K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_TARGET: tl.constexpr, DECOMPOSE: tl.constexpr,
    HAS_DMAP: tl.constexpr, HAS_TMAP: tl.constexpr,
):
    """Grid ``(N,)``; ``W``: fp32 weights ``[K]``; ``ITEMP``, ``OUT`` fp32."""
    n = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, K_PAD)
    kmask = k < K
    if HAS_DMAP:
        d = tl.load(DMAP + n).to(tl.int64)
    else:
        d = n
    if HAS_TMAP:
        r = tl.load(TMAP + n).to(tl.int64)
    else:
        r = n
    inv_temp = tl.load(ITEMP + n * stride_it)
    skip = (d < 0) | (d >= R_D) | (inv_temp <= 0.0) | (inv_temp == float("inf")) | (inv_temp != inv_temp)
    if HAS_TARGET:
        skip = skip | (r < 0) | (r >= R_T)
    # store_row's row stride N is stride_out here: OUT packs stats, draft_lse and target_lse
    STATS = OUT
    DLSE = OUT + 6 * stride_out
    TLSE = OUT + (6 + K) * stride_out
    if skip:
        nan = float("nan")
        lse = tl.full([K_PAD], float("nan"), tl.float32)
        store_row(STATS, DLSE, TLSE, n, stride_out, k, kmask, nan, nan, nan, nan, nan, nan, lse, nan)
    else:
        eu, jsd, kl, draft_entropy, mixture_entropy, target_entropy, lse, lse_p = row_results(
            D + d * stride_dn, T + r * stride_tn, W, k, kmask, stride_dk, V, inv_temp,
            K_PAD, BLOCK_V, HAS_TARGET, DECOMPOSE)
        store_row(STATS, DLSE, TLSE, n, stride_out, k, kmask, eu, jsd, kl, draft_entropy,
                  mixture_entropy, target_entropy, lse, lse_p)
