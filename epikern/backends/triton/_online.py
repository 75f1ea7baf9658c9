"""Triton device functions shared by the row and split kernels (design §1 numerics, fp32).

Online-softmax state of one distribution over the entries seen so far, relative to its running
maximum ``m`` of ``x = z / T``:

    s = Σ e^{x−m},   t = Σ e^{x−m}(x − m),   c = Σ e^{x−m}(x − y)   (y = target logits / T)

so that ``lse = m + log s``, ``H = log s − t/s`` and ``KL(q ‖ p) = c/s − lse + lse_p``. Rescaling
to a new maximum ``m' ≥ m``: ``s' = e^{m−m'} s``, ``t' = e^{m−m'} (t + (m − m') s)``,
``c' = e^{m−m'} c``; two partial states merge with the same formulas. ``−inf`` entries have
``e^{x−m} = 0`` and contribute nothing (``0·(−inf)`` is never formed); a state that has seen only
``−inf`` keeps ``m = −inf, s = t = c = 0``; a finite ``x`` against ``y = −inf`` (mass where
``p = 0``) makes ``c = +inf`` even where ``e^{x−m}`` underflows, and ``c`` stays ``+inf``; NaN
propagates through ``s`` into every result of its row.
"""

import triton
import triton.language as tl


@triton.jit
def _ref(m):
    """The maximum used as exponent offset: ``m``, or 0 while nothing finite has been seen."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _rescaled(m, s, t, c, ref, HAS_C: tl.constexpr):
    """``(s, t, c)`` of a state with maximum ``m`` re-expressed relative to ``ref ≥ m``."""
    a = tl.exp(m - ref)
    t = tl.where(s == 0.0, 0.0, a * (t + (m - ref) * s))
    if HAS_C:
        c = tl.where(c == float("inf"), c, a * c)
    return a * s, t, c


@triton.jit
def block_update(m, s, t, c, x, y, HAS_C: tl.constexpr):
    """Fold a ``[R, B]`` tile ``x`` into per-row states ``[R]``; ``y [1, B]`` feeds ``c``."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    ref = _ref(m_new)
    s, t, c = _rescaled(m, s, t, c, ref, HAS_C)
    xm = x - ref[:, None]
    e = tl.exp(xm)
    s += tl.sum(e, axis=1)
    t += tl.sum(tl.where(e == 0.0, 0.0, e * xm), axis=1)
    if HAS_C:  # a finite x against y = −inf is +inf even where e underflowed (as in forward_kl)
        xy = x - y
        c += tl.sum(tl.where(xy == float("inf"), xy, tl.where(e == 0.0, 0.0, e * xy)), axis=1)
    return m_new, s, t, c


@triton.jit
def fold_states(m, s, t, c, HAS_C: tl.constexpr):
    """Merge a ``[CB, R]`` tile of partial states along axis 0 into ``[R]`` (fixed order).

    Without ``HAS_C`` the returned ``c`` is only a placeholder of the right shape."""
    m_new = tl.max(m, axis=0)
    ref = _ref(m_new)
    s, t, c = _rescaled(m, s, t, c, ref[None, :], HAS_C)
    return m_new, tl.sum(s, axis=0), tl.sum(t, axis=0), tl.sum(c, axis=0)


@triton.jit
def merge_states(m1, s1, t1, c1, m2, s2, t2, c2, HAS_C: tl.constexpr):
    """Merge two partial states elementwise."""
    m = tl.maximum(m1, m2)
    ref = _ref(m)
    s1, t1, c1 = _rescaled(m1, s1, t1, c1, ref, HAS_C)
    s2, t2, c2 = _rescaled(m2, s2, t2, c2, ref, HAS_C)
    return m, s1 + s2, t1 + t2, c1 + c2


@triton.jit
def weighted_sum(w, x):
    """``Σ_k w_k x_k`` where a zero weight silences its entry even if ``x_k`` is ±inf or NaN."""
    return tl.sum(tl.where(w != 0.0, w * x, 0.0), axis=0)


@triton.jit
def finish_states(m, s, t, c, w, mp, sp, tp, HAS_TARGET: tl.constexpr):
    """Row results from merged states: draft ``[K_PAD]`` (``w = 0`` on padding), target ``[1]``.

    Returns ``(eu, draft_entropy, target_entropy, draft_lse [K_PAD], target_lse)``; quantities
    that need the target are NaN without it.
    """
    log_s = tl.log(s)
    lse = m + log_s
    draft_entropy = weighted_sum(w, log_s - t / s)
    if HAS_TARGET:
        log_sp = tl.log(sp)
        lse_p = tl.sum(mp + log_sp, axis=0)
        target_entropy = tl.sum(log_sp - tp / sp, axis=0)
        eu = weighted_sum(w, c / s - lse + lse_p)
    else:
        lse_p = float("nan")
        target_entropy = float("nan")
        eu = float("nan")
    return eu, draft_entropy, target_entropy, lse, lse_p


@triton.jit
def mixture_block(x, y, lse, log_w, lse_p, HAS_TARGET: tl.constexpr):
    """Second-sweep terms of a ``[K_PAD, B]`` tile, each ``[B]`` (summed over the drafts).

    ``l_k = log w_k + x_k − lse_k``, ``log q̄ = logsumexp_k l_k``; returns
    ``Σ_k e^{l_k}(x_k − lse_k − log q̄)`` (jsd), ``−q̄ log q̄`` (mixture entropy) and
    ``q̄ (log q̄ − y + lse_p)`` (KL(q̄ ‖ p)), with ``0·(anything) = 0``. ``lse`` must be finite (0)
    and ``log_w = −inf`` on padded drafts.
    """
    lq = x - lse[:, None]
    lw = log_w[:, None] + lq
    lmax = _ref(tl.max(lw, axis=0))
    el = tl.exp(lw - lmax[None, :])
    log_qbar = lmax + tl.log(tl.sum(el, axis=0))
    wq = el * tl.exp(lmax)[None, :]
    jsd = tl.sum(tl.where(wq == 0.0, 0.0, wq * (lq - log_qbar[None, :])), axis=0)
    qbar = tl.exp(log_qbar)
    ent = tl.where(qbar == 0.0, 0.0, -qbar * log_qbar)
    if HAS_TARGET:
        # a q̄ that underflowed against y = −inf is still +inf (log q̄ is finite; design §1.1 rule 6)
        d = log_qbar - y + lse_p
        kl = tl.where(d == float("inf"), d, tl.where(qbar == 0.0, 0.0, qbar * d))
    else:
        kl = tl.zeros_like(ent)
    return jsd, ent, kl


@triton.jit
def load_raw(D, k, kmask, stride_dk, offs, vmask):
    """``[K_PAD, B]`` logits (their own dtype) of the draft rows at ``D``; padding is ``−inf``."""
    ptrs = D + k.to(tl.int64)[:, None] * stride_dk + offs[None, :]
    return tl.load(ptrs, mask=kmask[:, None] & vmask[None, :], other=float("-inf"))


@triton.jit
def load_tile(D, k, kmask, stride_dk, offs, vmask, inv_temp):
    """``[K_PAD, B]`` fp32 tile of ``z / T`` from draft row pointer ``D``; padding is ``−inf``."""
    return load_raw(D, k, kmask, stride_dk, offs, vmask).to(tl.float32) * inv_temp


@triton.jit
def load_target(T, offs, vmask, inv_temp):
    """``[B]`` fp32 ``z_p / T`` of one target row; padding is ``−inf``."""
    y = tl.load(T + offs, mask=vmask, other=float("-inf"))
    return y.to(tl.float32) * inv_temp


@triton.jit
def sweep_states(D, T, k, kmask, stride_dk, lo, hi, inv_temp,
                 K_PAD: tl.constexpr, BLOCK_V: tl.constexpr, HAS_TARGET: tl.constexpr):
    """Online-softmax states of vocabulary entries ``[lo, hi)`` of the draft rows at ``D`` and the
    target row at ``T``: ``(m, s, t, c)`` each ``[K_PAD]``, ``(mp, sp, tp)`` each ``[1]``.

    The loads of the next block are issued before the current block is reduced (a register double
    buffer of raw, not yet upcast, logits) so that memory latency overlaps the arithmetic; past
    ``hi`` they are fully masked and move no bytes.
    """
    v = tl.arange(0, BLOCK_V)
    m = tl.full([K_PAD], float("-inf"), tl.float32)
    s = tl.zeros([K_PAD], tl.float32)
    t = tl.zeros([K_PAD], tl.float32)
    c = tl.zeros([K_PAD], tl.float32)
    mp = tl.full([1], float("-inf"), tl.float32)
    sp = tl.zeros([1], tl.float32)
    tp = tl.zeros([1], tl.float32)
    offs = lo + v
    x_next = load_raw(D, k, kmask, stride_dk, offs, offs < hi)
    if HAS_TARGET:
        y_next = tl.load(T + offs, mask=offs < hi, other=float("-inf"))
    for start in range(lo, hi, BLOCK_V):
        x = x_next.to(tl.float32) * inv_temp
        offs = start + BLOCK_V + v
        x_next = load_raw(D, k, kmask, stride_dk, offs, offs < hi)
        if HAS_TARGET:
            y = y_next.to(tl.float32)[None, :] * inv_temp
            y_next = tl.load(T + offs, mask=offs < hi, other=float("-inf"))
            m, s, t, c = block_update(m, s, t, c, x, y, True)
            mp, sp, tp, _ = block_update(mp, sp, tp, tp, y, y, False)
        else:
            m, s, t, c = block_update(m, s, t, c, x, x, False)
    return m, s, t, c, mp, sp, tp


@triton.jit
def sweep_mixture(D, T, k, kmask, stride_dk, lo, hi, inv_temp, lse, w, lse_p,
                  BLOCK_V: tl.constexpr, HAS_TARGET: tl.constexpr):
    """Sums of the :func:`mixture_block` terms over vocabulary entries ``[lo, hi)``: scalars
    ``(jsd, mixture_entropy, kl)`` (``kl`` is 0 without a target). ``lse [K_PAD]`` and
    ``w [K_PAD]`` (0 on padding) come from the first sweep. Blocks are walked last to first, so
    the most recently read ones (still in L2) come first."""
    lse = tl.where(kmask, lse, 0.0)
    log_w = tl.log(w)
    v = tl.arange(0, BLOCK_V)
    acc_jsd = tl.zeros([BLOCK_V], tl.float32)
    acc_ent = tl.zeros([BLOCK_V], tl.float32)
    acc_kl = tl.zeros([BLOCK_V], tl.float32)
    n_blocks = tl.cdiv(hi - lo, BLOCK_V)
    for i in range(0, n_blocks):
        offs = lo + (n_blocks - 1 - i) * BLOCK_V + v
        vmask = offs < hi
        x = load_tile(D, k, kmask, stride_dk, offs, vmask, inv_temp)
        if HAS_TARGET:
            y = load_target(T, offs, vmask, inv_temp)
        else:
            y = offs
        jsd_b, ent_b, kl_b = mixture_block(x, y, lse, log_w, lse_p, HAS_TARGET)
        acc_jsd += jsd_b
        acc_ent += ent_b
        acc_kl += kl_b
    return tl.sum(acc_jsd, axis=0), tl.sum(acc_ent, axis=0), tl.sum(acc_kl, axis=0)


@triton.jit
def store_row(STATS, DLSE, TLSE, n, N, k, kmask, eu, jsd, kl, draft_entropy, mixture_entropy,
              target_entropy, lse, lse_p):
    """Write one row of the packed outputs ``stats [6, N]``, ``draft_lse [K, N]``, ``target_lse [N]``."""
    tl.store(STATS + n, eu)
    tl.store(STATS + N + n, jsd)
    tl.store(STATS + 2 * N + n, kl)
    tl.store(STATS + 3 * N + n, draft_entropy)
    tl.store(STATS + 4 * N + n, mixture_entropy)
    tl.store(STATS + 5 * N + n, target_entropy)
    tl.store(DLSE + k.to(tl.int64) * N + n, lse, mask=kmask)
    tl.store(TLSE + n, lse_p)
