"""Triton kernels of ``epikern::forward_kl`` and ``epikern::forward_kl_backward``.

One program per row, streaming the vocabulary in ``BLOCK``-wide tiles (int64 row offsets, fp32
accumulation, fp32/fp16/bf16 logits read in place). With ``x = s/T``, ``y = t/T``:

forward (one sweep, online softmax of both rows; ``m`` running maxima, block-uniform, so the
sums are kept per lane and reduced once at the end)::

    z_s = Σ e^{x − m_s},  z_t = Σ e^{y − m_t},  a = Σ e^{y − m_t} (y − x)   (0 where y = −inf)
    lse_s = m_s + log z_s,  lse_t = m_t + log z_t
    loss  = a / z_t − lse_t + lse_s                = KL(p ‖ q)

``y`` finite with ``x = −inf`` makes the term ``+inf`` even if ``e^{y − m_t}`` underflows.

backward (one sweep)::

    grad[v] = g · (e^{x_v − lse_s} − e^{y_v − lse_t}) / T      (rows with g = 0: zeros, no reads)
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import BackendUnavailableError

_MAX_BLOCK = 4096


def _forward_kl_fwd_kernel(
    S, T, KEEP, LOSS, SLSE, TLSE,
    stride_s, stride_t, V, inv_temp,
    HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    if HAS_KEEP:
        live = tl.load(KEEP + row) != 0
        limit = tl.where(live, V, 0)  # a dropped row reads nothing
    else:
        limit = V
    neg_inf = float("-inf")
    m_s = tl.full((), neg_inf, tl.float32)
    m_t = tl.full((), neg_inf, tl.float32)
    # per-lane partial sums relative to the (block-uniform) running maxima: two reductions per
    # tile (the maxima), the sums are reduced once at the end
    z_s = tl.zeros((BLOCK,), tl.float32)
    z_t = tl.zeros((BLOCK,), tl.float32)
    a = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < limit
        x = tl.load(s_row + cols, mask=mask, other=neg_inf).to(tl.float32) * inv_temp
        y = tl.load(t_row + cols, mask=mask, other=neg_inf).to(tl.float32) * inv_temp

        new_s = tl.maximum(m_s, tl.max(x, axis=0))
        ref_s = tl.where(new_s == neg_inf, 0.0, new_s)
        z_s = z_s * tl.exp(m_s - ref_s) + tl.exp(x - ref_s)
        m_s = new_s

        new_t = tl.maximum(m_t, tl.max(y, axis=0))
        ref_t = tl.where(new_t == neg_inf, 0.0, new_t)
        e = tl.exp(y - ref_t)
        d = tl.where(y == neg_inf, 0.0, y - x)
        term = tl.where(d == float("inf"), d, e * d)
        rescale = tl.exp(m_t - ref_t)
        z_t = z_t * rescale + e
        # a = +inf (teacher mass on a −inf student logit) stays +inf when the rescale underflows
        a = tl.where(a == float("inf"), a, a * rescale) + term
        m_t = new_t
    sum_s = tl.sum(z_s, axis=0)
    sum_t = tl.sum(z_t, axis=0)
    lse_s = m_s + tl.log(sum_s)
    lse_t = m_t + tl.log(sum_t)
    loss = tl.sum(a, axis=0) / sum_t - lse_t + lse_s
    if HAS_KEEP:
        loss = tl.where(live, loss, 0.0)
        lse_s = tl.where(live, lse_s, 0.0)
        lse_t = tl.where(live, lse_t, 0.0)
    tl.store(LOSS + row, loss)
    tl.store(SLSE + row, lse_s)
    tl.store(TLSE + row, lse_t)


def _forward_kl_bwd_kernel(
    G, S, T, SLSE, TLSE, OUT,
    stride_s, stride_t, stride_o, V, inv_temp,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(G + row).to(tl.float32)
    live = g != 0.0
    limit = tl.where(live, V, 0)  # a row with zero upstream gradient reads nothing
    scale = g * inv_temp
    lse_s = tl.load(SLSE + row).to(tl.float32)
    lse_t = tl.load(TLSE + row).to(tl.float32)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    o_row = OUT + row * stride_o
    neg_inf = float("-inf")
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < limit
        x = tl.load(s_row + cols, mask=mask, other=neg_inf).to(tl.float32) * inv_temp
        y = tl.load(t_row + cols, mask=mask, other=neg_inf).to(tl.float32) * inv_temp
        grad = (tl.exp(x - lse_s) - tl.exp(y - lse_t)) * scale
        grad = tl.where(live, grad, 0.0)
        tl.store(o_row + cols, grad.to(OUT.dtype.element_ty), mask=cols < V)


@lru_cache(maxsize=None)
def _kernels():
    """The two kernels, ``triton.jit``-ed at first use: ``TRITON_INTERPRET`` is read then."""
    return triton.jit(_forward_kl_fwd_kernel), triton.jit(_forward_kl_bwd_kernel)


def _launchable(x: Tensor, kernel) -> None:
    if not x.is_cuda and hasattr(kernel, "cache_key"):  # a compiled (not interpreted) kernel
        raise BackendUnavailableError(
            f"backend 'triton' got tensors on {x.device}, but its forward_kl kernels were compiled "
            "for the GPU: TRITON_INTERPRET=1 must be set before their first use to run them on the "
            "CPU interpreter")


def _block(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), _MAX_BLOCK)


def _warps(block: int) -> int:
    return 8 if block >= 4096 else 4 if block >= 1024 else 1


def _device_of(x: Tensor):
    """Launch on the tensor's CUDA device (its current stream); a no-op under the interpreter."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def forward_kl_out(
    student: Tensor,
    teacher: Tensor,
    keep: Optional[Tensor],
    temperature: float,
    loss: Tensor,
    student_lse: Tensor,
    teacher_lse: Tensor,
) -> None:
    """Backend entry of ``epikern::forward_kl``: ``[N, V]`` rows (unit stride over V) → ``[N]``."""
    N, V = student.shape
    block = _block(V)
    kernel = _kernels()[0]
    _launchable(student, kernel)
    with _device_of(student):
        kernel[(N,)](
            student, teacher, loss if keep is None else keep, loss, student_lse, teacher_lse,
            student.stride(0), teacher.stride(0), V, 1.0 / temperature,
            HAS_KEEP=keep is not None, BLOCK=block, num_warps=_warps(block),
        )


def forward_kl_backward_out(
    grad_loss: Tensor,
    student: Tensor,
    teacher: Tensor,
    student_lse: Tensor,
    teacher_lse: Tensor,
    temperature: float,
    grad_student: Tensor,
) -> None:
    """Backend entry of ``epikern::forward_kl_backward``; ``grad_student`` may alias ``student``."""
    N, V = student.shape
    block = _block(V)
    kernel = _kernels()[1]
    _launchable(student, kernel)
    with _device_of(student):
        kernel[(N,)](
            grad_loss, student, teacher, student_lse, teacher_lse, grad_student,
            student.stride(0), teacher.stride(0), grad_student.stride(0), V, 1.0 / temperature,
            BLOCK=block, num_warps=_warps(block),
        )
