"""``ek.forward_kl`` and ``ek.fused_linear_forward_kl``: forward-KL distillation losses.

Per row (token position) with student logits ``s``, teacher logits ``t`` and temperature T:

    q = softmax(s / T),  p = softmax(t / T)
    loss_row = KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)
             = E_p[(t − s) / T] + lse(s / T) − lse(t / T)
    ∂loss_row / ∂s_v = (q_v − p_v) / T

No ``T²`` factor is applied (multiply the loss by ``T**2`` yourself for Hinton-style distillation).
The gradient flows to the student only; the teacher is a constant.

Op layout (all on flattened rows ``[N, V]`` with unit stride over V, any row stride):

* ``epikern::forward_kl(student, teacher, keep, T, backend) -> (loss [N], student_lse [N],
  teacher_lse [N])`` — one sweep; rows with ``keep = False`` are skipped (loss 0). The two
  log-normalisers are the only state saved for backward.
* ``epikern::forward_kl_backward(grad_loss [N], student, teacher, student_lse, teacher_lse, T,
  backend) -> grad_student [N, V]`` in the student's dtype; recomputes ``q − p`` from the logits
  and the saved normalisers, so no ``[N, V]`` float32 buffer exists besides the gradient itself.
  Rows with ``grad_loss = 0`` (dropped rows) are written as zeros without reading the logits.
* ``epikern::fused_linear_forward_kl`` / ``..._backward``: the same loss on ``hidden @ weight.T``,
  computed chunk by chunk over rows on top of the two ops' backend entry points, so only one
  ``[chunk, V]`` block of student logits (reused in place for its gradient) exists at a time;
  the backward recomputes the chunk's logits. ``epikern::fused_linear_forward_kl_sum`` serves the
  scalar reductions: the summed loss and both gradients in one pass (backward only scales them).

Backend entry points (``epikern.backends``): ``forward_kl_out(student, teacher, keep, temperature,
loss, student_lse, teacher_lse)`` and ``forward_kl_backward_out(grad_loss, student, teacher,
student_lse, teacher_lse, temperature, grad_student)``; ``grad_student`` may alias ``student``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from . import _checks, flops

_REDUCTIONS = ("mean", "sum", "none")
#: Elements of one ``[chunk, V]`` block of student logits in the fused-linear op (32 MiB fp32).
_CHUNK_ELEMENTS = 1 << 23


def _entry(op: str, backend: str, **tensors: Tensor):
    """Entry point of ``op`` in ``backend`` (``""``: automatic for the tensors' device)."""
    first = next(iter(tensors.values()))
    name = backends.select(op, first.device, backend or None)
    _checks.check_reference_dtype(name, **tensors)
    return backends.entry(op, name)


def _loss_dtype(x: Tensor) -> torch.dtype:
    """float32 for fp32/fp16/bf16 inputs, float64 for the reference-only float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _row_stats(like: Tensor, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(like.new_empty((n,), dtype=dtype) for _ in range(3))


# --------------------------------------------------------------------------------------------
# forward_kl on logits


@torch.library.custom_op("epikern::forward_kl", mutates_args=())
def _forward_kl_op(
    student: Tensor, teacher: Tensor, keep: Optional[Tensor], temperature: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``KL(p ‖ q)`` and both log-normalisers of ``[N, V]`` logits (0 where not kept).

    ``backend`` is a backend name or ``""`` (automatic); it is resolved here, at run time, so that
    compiled graphs see one opaque call.
    """
    fwd = _entry("forward_kl", backend, student_logits=student, teacher_logits=teacher)
    loss, student_lse, teacher_lse = _row_stats(student, student.shape[0], _loss_dtype(student))
    if student.shape[0] > 0:
        fwd(student, teacher, keep, temperature, loss, student_lse, teacher_lse)
    return loss, student_lse, teacher_lse


@_forward_kl_op.register_fake
def _(student, teacher, keep, temperature, backend):
    return _row_stats(student, student.shape[0], _loss_dtype(student))


@torch.library.custom_op("epikern::forward_kl_backward", mutates_args=())
def _forward_kl_backward_op(
    grad_loss: Tensor,
    student: Tensor,
    teacher: Tensor,
    student_lse: Tensor,
    teacher_lse: Tensor,
    temperature: float,
    backend: str,
) -> Tensor:
    """``grad_student[i, v] = grad_loss[i] · (q_iv − p_iv) / T`` (zeros where ``grad_loss = 0``)."""
    bwd = _entry("forward_kl_backward", backend, student_logits=student,
                 teacher_logits=teacher)
    grad_student = torch.empty_like(student, memory_format=torch.contiguous_format)
    if student.shape[0] > 0:
        bwd(grad_loss, student, teacher, student_lse, teacher_lse, temperature, grad_student)
    return grad_student


@_forward_kl_backward_op.register_fake
def _(grad_loss, student, teacher, student_lse, teacher_lse, temperature, backend):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _masked_grad(grad_loss: Tensor, keep: Optional[Tensor]) -> Tensor:
    """Upstream per-row gradient as the stats dtype, zero on dropped rows."""
    if keep is None:
        return grad_loss
    zero = torch.zeros((), dtype=grad_loss.dtype, device=grad_loss.device)
    return torch.where(keep, grad_loss, zero)


def _forward_kl_setup(ctx, inputs, output):
    student, teacher, keep, temperature, backend = inputs
    _, student_lse, teacher_lse = output
    ctx.save_for_backward(student, teacher, keep, student_lse, teacher_lse)
    ctx.temperature, ctx.backend = temperature, backend
    ctx.mark_non_differentiable(student_lse, teacher_lse)


def _forward_kl_backward(ctx, grad_loss, _grad_student_lse, _grad_teacher_lse):
    student, teacher, keep, student_lse, teacher_lse = ctx.saved_tensors
    grad = _forward_kl_backward_op(
        _masked_grad(grad_loss, keep).contiguous(), student, teacher, student_lse, teacher_lse,
        ctx.temperature, ctx.backend,
    )
    return grad, None, None, None, None


_forward_kl_op.register_autograd(_forward_kl_backward, setup_context=_forward_kl_setup)


# --------------------------------------------------------------------------------------------
# fused linear + forward_kl


def default_chunk_rows(n: int, vocab: int) -> int:
    """Rows per chunk so that one ``[chunk, V]`` block holds about 2**23 elements (≥ 1 row)."""
    return max(1, min(n, _CHUNK_ELEMENTS // max(vocab, 1)))


@torch.library.custom_op("epikern::fused_linear_forward_kl", mutates_args=())
def _fused_linear_op(
    hidden: Tensor,
    weight: Tensor,
    teacher: Tensor,
    keep: Optional[Tensor],
    temperature: float,
    chunk_rows: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``forward_kl`` of ``hidden [N, d] @ weight[V, d].T`` against ``teacher [N, V]``, chunked."""
    fwd = _entry("forward_kl", backend, student_hidden=hidden, teacher_logits=teacher)
    N = hidden.shape[0]
    loss, student_lse, teacher_lse = _row_stats(hidden, N, _loss_dtype(hidden))
    for rows, logits in _chunk_logits(hidden, weight, chunk_rows):
        fwd(logits, teacher[rows], None if keep is None else keep[rows], temperature,
            loss[rows], student_lse[rows], teacher_lse[rows])
    return loss, student_lse, teacher_lse


@_fused_linear_op.register_fake
def _(hidden, weight, teacher, keep, temperature, chunk_rows, backend):
    return _row_stats(hidden, hidden.shape[0], _loss_dtype(hidden))


def _chunk_logits(hidden: Tensor, weight: Tensor, chunk_rows: int):
    """Yields ``(rows, hidden[rows] @ weight.T)`` chunk by chunk, all in one reused buffer."""
    N = hidden.shape[0]
    buf = hidden.new_empty((min(chunk_rows, N), weight.shape[0]))
    for start in range(0, N, chunk_rows):
        rows = slice(start, min(start + chunk_rows, N))
        yield rows, torch.mm(hidden[rows], weight.t(), out=buf[: rows.stop - start])


def _grad_buffers(hidden: Tensor, weight: Tensor, need_hidden: bool,
                  need_weight: bool) -> tuple[Tensor, Tensor]:
    """``grad_hidden`` (hidden's dtype) and the zeroed float32 ``dW`` accumulator, or ``[0]``."""
    grad_hidden = hidden.new_empty(hidden.shape if need_hidden else (0,))
    dtype = torch.promote_types(weight.dtype, torch.float32)
    grad_weight32 = torch.zeros(weight.shape if need_weight else (0,), dtype=dtype,
                                device=weight.device)
    return grad_hidden, grad_weight32


def _chunk_grads(g: Tensor, hidden: Tensor, weight: Tensor, rows: slice, grad_hidden: Tensor,
                 grad_weight32: Tensor) -> None:
    """``grad_hidden[rows] = G @ W`` and ``dW += G.T @ h[rows]`` for a chunk's logit gradient G.

    For fp16/bf16 weights each chunk's ``G.T @ h`` is one GEMM with fp32 accumulation inside,
    rounded once before it is added to the float32 ``dW``. Empty buffers are skipped.
    """
    if grad_hidden.numel():
        torch.mm(g, weight, out=grad_hidden[rows])
    if grad_weight32.numel():
        if grad_weight32.dtype == g.dtype:
            grad_weight32.addmm_(g.t(), hidden[rows])
        else:
            grad_weight32.add_(g.t() @ hidden[rows])


@torch.library.custom_op("epikern::fused_linear_forward_kl_backward", mutates_args=())
def _fused_linear_backward_op(
    grad_loss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    teacher: Tensor,
    student_lse: Tensor,
    teacher_lse: Tensor,
    temperature: float,
    chunk_rows: int,
    need_hidden: bool,
    need_weight: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(grad_hidden [N, d], grad_weight [V, d])``; a gradient not needed is returned as ``[0]``.

    Per chunk: recompute ``logits = h_c @ W.T``, overwrite them in place with
    ``G = grad_loss · (q − p) / T``, then ``grad_h_c = G @ W`` and ``dW += G.T @ h_c``
    (:func:`_chunk_grads`; ``dW`` is accumulated across chunks in float32).
    """
    bwd = _entry("forward_kl_backward", backend, student_hidden=hidden, teacher_logits=teacher)
    N = hidden.shape[0]
    grad_hidden, grad_weight32 = _grad_buffers(hidden, weight, need_hidden, need_weight)
    for rows, g in _chunk_logits(hidden, weight, chunk_rows):
        bwd(grad_loss[rows], g, teacher[rows], student_lse[rows], teacher_lse[rows], temperature, g)
        _chunk_grads(g, hidden, weight, rows, grad_hidden, grad_weight32)
    return grad_hidden, grad_weight32.to(weight.dtype)


@_fused_linear_backward_op.register_fake
def _(grad_loss, hidden, weight, teacher, student_lse, teacher_lse, temperature, chunk_rows,
      need_hidden, need_weight, backend):
    return (
        hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty((0,)),
        weight.new_empty(weight.shape) if need_weight else weight.new_empty((0,)),
    )


def _fused_linear_setup(ctx, inputs, output):
    hidden, weight, teacher, keep, temperature, chunk_rows, backend = inputs
    _, student_lse, teacher_lse = output
    ctx.save_for_backward(hidden, weight, teacher, keep, student_lse, teacher_lse)
    ctx.temperature, ctx.chunk_rows, ctx.backend = temperature, chunk_rows, backend
    ctx.mark_non_differentiable(student_lse, teacher_lse)


def _fused_linear_backward(ctx, grad_loss, _grad_student_lse, _grad_teacher_lse):
    hidden, weight, teacher, keep, student_lse, teacher_lse = ctx.saved_tensors
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_hidden, grad_weight = _fused_linear_backward_op(
        _masked_grad(grad_loss, keep).contiguous(), hidden, weight, teacher, student_lse,
        teacher_lse, ctx.temperature, ctx.chunk_rows, need_hidden, need_weight, ctx.backend,
    )
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            None, None, None, None, None)


_fused_linear_op.register_autograd(_fused_linear_backward, setup_context=_fused_linear_setup)


@torch.library.custom_op("epikern::fused_linear_forward_kl_sum", mutates_args=())
def _fused_linear_sum_op(
    hidden: Tensor,
    weight: Tensor,
    teacher: Tensor,
    keep: Optional[Tensor],
    temperature: float,
    chunk_rows: int,
    need_hidden: bool,
    need_weight: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σ_kept loss_row, its gradient w.r.t. hidden, w.r.t. weight (float32))`` in one pass.

    For the scalar reductions the upstream gradient is one number, so the gradients are formed
    per chunk right after the loss (3 GEMMs in all, as Liger's fused-linear losses do) and only
    scaled in backward, instead of recomputing the logits there (4 GEMMs).
    """
    fwd = _entry("forward_kl", backend, student_hidden=hidden, teacher_logits=teacher)
    bwd = _entry("forward_kl_backward", backend, student_hidden=hidden, teacher_logits=teacher)
    N = hidden.shape[0]
    loss, student_lse, teacher_lse = _row_stats(hidden, N, _loss_dtype(hidden))
    unit = (loss.new_ones((N,)) if keep is None else keep.to(loss.dtype))
    grad_hidden, grad_weight32 = _grad_buffers(hidden, weight, need_hidden, need_weight)
    for rows, g in _chunk_logits(hidden, weight, chunk_rows):
        fwd(g, teacher[rows], None if keep is None else keep[rows], temperature, loss[rows],
            student_lse[rows], teacher_lse[rows])
        bwd(unit[rows], g, teacher[rows], student_lse[rows], teacher_lse[rows], temperature, g)
        _chunk_grads(g, hidden, weight, rows, grad_hidden, grad_weight32)
    return loss.sum(), grad_hidden, grad_weight32


@_fused_linear_sum_op.register_fake
def _(hidden, weight, teacher, keep, temperature, chunk_rows, need_hidden, need_weight, backend):
    dtype = _loss_dtype(hidden)
    return (hidden.new_empty((), dtype=dtype),
            hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,), dtype=dtype))


def _fused_linear_sum_setup(ctx, inputs, output):
    _, grad_hidden, grad_weight32 = output
    ctx.save_for_backward(grad_hidden, grad_weight32)
    ctx.weight_dtype = inputs[1].dtype
    ctx.computed = inputs[6:8]  # need_hidden, need_weight: the gradients formed in forward
    ctx.mark_non_differentiable(grad_hidden, grad_weight32)


def _fused_linear_sum_backward(ctx, grad_total, _grad_hidden, _grad_weight):
    grad_hidden, grad_weight32 = ctx.saved_tensors
    need_hidden = ctx.needs_input_grad[0] and ctx.computed[0]
    need_weight = ctx.needs_input_grad[1] and ctx.computed[1]
    # a 0-dim float32 scale keeps the tensor's dtype; for fp16/bf16 weights the cast comes first
    # so that no second [V, d] float32 tensor exists
    return (
        grad_hidden * grad_total if need_hidden else None,
        grad_weight32.to(ctx.weight_dtype) * grad_total if need_weight else None,
        None, None, None, None, None, None, None,
    )


_fused_linear_sum_op.register_autograd(_fused_linear_sum_backward,
                                       setup_context=_fused_linear_sum_setup)


# FLOPs of the GEMMs inside the fused-linear ops for FlopCounterMode (ops/flops.py): like aten::mm,
# 2·N·d·V per GEMM, elementwise work uncounted.


def _gemm_flops(hidden_shape, weight_shape, gemms: int) -> int:
    return gemms * 2 * hidden_shape[0] * hidden_shape[1] * weight_shape[0]


@flops.flop_formula("fused_linear_forward_kl")
def _(hidden, weight, *args, out_shape=None, **kwargs) -> int:
    return _gemm_flops(hidden, weight, 1)


@flops.flop_formula("fused_linear_forward_kl_backward")
def _(grad_loss, hidden, weight, teacher, student_lse, teacher_lse, temperature, chunk_rows,
      need_hidden, need_weight, backend, out_shape=None) -> int:
    return _gemm_flops(hidden, weight, 1 + int(need_hidden) + int(need_weight))


@flops.flop_formula("fused_linear_forward_kl_sum")
def _(hidden, weight, teacher, keep, temperature, chunk_rows, need_hidden, need_weight,
      backend, out_shape=None) -> int:
    return _gemm_flops(hidden, weight, 1 + int(need_hidden) + int(need_weight))


# --------------------------------------------------------------------------------------------
# public API


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Forward-KL distillation loss ``KL(softmax(t/T) ‖ softmax(s/T))`` per row, fused.

    Args:
        student_logits: ``[*batch, V]`` float32/float16/bfloat16 logits of the student (the only
            input that receives a gradient).
        teacher_logits: ``[*batch, V]`` logits of the teacher, any of the same dtypes (the mix is
            free). ``−inf`` entries are tokens the teacher never emits: they contribute nothing.
        temperature: T > 0 applied to both, ``softmax(z / T)``. **No ``T²`` factor** is applied.
        reduction: ``"mean"`` (over kept rows; 0 when no row is kept), ``"sum"``, or ``"none"``
            (``[*batch]``, dropped rows are 0).
        labels: ``[*batch]`` integer labels; rows whose label equals ``ignore_index`` are dropped
            (their loss is 0 and their gradient exactly 0). None keeps every row.
        ignore_index: the label value that drops a row.
        vocab_size: compare only the first ``vocab_size`` logits (padded vocabularies that differ);
            the student's padded columns get a zero gradient.
        backend: ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"``; default by device, or the
            ``EPIKERN_BACKEND`` environment variable.

    Returns:
        The loss in float32 (float64 for float64 inputs, served by ``backend="torch"`` only): a
        scalar, or ``[*batch]`` for ``reduction="none"``. Where the teacher gives a token mass
        that the student gives probability 0 (``s = −inf``) the row's loss is ``+inf``; a row with
        NaN yields NaN in that row only.

    The forward pass reads each logit once and saves two float32 numbers per row; the backward
    pass recomputes ``∂loss/∂s = grad · (softmax(s/T) − softmax(t/T)) / T`` from the logits.
    """
    _checks.check_logits("student_logits", student_logits, min_dim=1)
    _checks.check_logits("teacher_logits", teacher_logits, min_dim=1)
    _check_same_rows("student_logits", student_logits, "teacher_logits", teacher_logits)
    student_logits, teacher_logits = _checks.shared_vocab(
        vocab_size, {"student_logits": student_logits, "teacher_logits": teacher_logits})
    temperature = _checks.check_temperature(temperature)
    _check_reduction(reduction)
    batch = student_logits.shape[:-1]
    keep = _keep_rows(labels, ignore_index, batch)
    _checks.check_same_device(student_logits=student_logits, teacher_logits=teacher_logits,
                              labels=labels)
    V = student_logits.shape[-1]
    student = _checks.last_dim_contiguous(student_logits.reshape(-1, V))
    teacher = _checks.last_dim_contiguous(teacher_logits.reshape(-1, V))
    per_row, _, _ = _forward_kl_op(student, teacher, keep, temperature, backend or "")
    return _reduce(per_row.reshape(batch), keep, reduction)


def fused_linear_forward_kl(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
    chunk_rows: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """:func:`forward_kl` of ``student_hidden @ lm_head_weight.T`` without the full logits.

    Args:
        student_hidden: ``[*batch, d]`` final hidden states of the student (fp32/fp16/bf16).
        lm_head_weight: ``[V, d]`` LM-head weight, same dtype as ``student_hidden``.
        teacher_logits: ``[*batch, V]`` teacher logits (``−inf`` allowed).
        temperature, reduction, labels, ignore_index, backend: as in :func:`forward_kl`
            (no ``T²`` factor).
        vocab_size: use only the first ``vocab_size`` rows of the weight and logits of the
            teacher (padded vocabularies); the padded weight rows get a zero gradient.
        chunk_rows: rows of student logits materialised at once (default: about 2**23 elements
            per chunk). Peak extra memory is one ``[chunk_rows, V]`` block of logits (overwritten
            by its own gradient in backward), the ``[V, d]`` float32 ``dW`` accumulator and the
            gradients themselves: ``O(chunk_rows · V + V · d)``, never ``N · V``.

    Returns:
        As :func:`forward_kl`. Gradients flow to ``student_hidden`` and ``lm_head_weight``, the
        weight gradient accumulated over chunks in float32. With autograd recording and a scalar
        reduction the gradients are formed chunk by chunk during the forward pass (3 GEMMs in
        all; backward only scales them by the upstream gradient). For ``reduction="none"`` the
        backward pass recomputes each chunk's logits (4 GEMMs); without autograd only the
        forward GEMM runs.
    """
    flops.register_flop_formulas()
    _checks.check_logits("student_hidden", student_hidden, min_dim=1)
    _checks.check_logits("lm_head_weight", lm_head_weight, min_dim=2)
    _checks.check_logits("teacher_logits", teacher_logits, min_dim=1)
    if lm_head_weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be [V, d], got shape {tuple(lm_head_weight.shape)}")
    if lm_head_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"hidden size mismatch: student_hidden {tuple(student_hidden.shape)} has "
            f"d={student_hidden.shape[-1]}, lm_head_weight {tuple(lm_head_weight.shape)} has "
            f"d={lm_head_weight.shape[1]}"
        )
    if lm_head_weight.dtype != student_hidden.dtype:
        raise TypeError(
            f"student_hidden and lm_head_weight must share a dtype, got {student_hidden.dtype} "
            f"and {lm_head_weight.dtype}"
        )
    _check_same_rows("student_hidden", student_hidden, "teacher_logits", teacher_logits)
    lm_head_weight, teacher_logits = _checks.shared_vocab(
        vocab_size, {"lm_head_weight": lm_head_weight, "teacher_logits": teacher_logits},
        vocab_dims={"lm_head_weight": 0})
    temperature = _checks.check_temperature(temperature)
    _check_reduction(reduction)
    batch = student_hidden.shape[:-1]
    keep = _keep_rows(labels, ignore_index, batch)
    _checks.check_same_device(student_hidden=student_hidden, lm_head_weight=lm_head_weight,
                              teacher_logits=teacher_logits, labels=labels)
    V, d = lm_head_weight.shape
    hidden = student_hidden.reshape(-1, d)
    teacher = _checks.last_dim_contiguous(teacher_logits.reshape(-1, V))
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(hidden.shape[0], V)
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    need_hidden = torch.is_grad_enabled() and student_hidden.requires_grad
    need_weight = torch.is_grad_enabled() and lm_head_weight.requires_grad
    if reduction != "none" and (need_hidden or need_weight):
        total, _, _ = _fused_linear_sum_op(hidden, lm_head_weight, teacher, keep, temperature,
                                           chunk_rows, need_hidden, need_weight, backend or "")
        return _reduce_total(total, keep, hidden.shape[0], reduction)
    per_row, _, _ = _fused_linear_op(hidden, lm_head_weight, teacher, keep, temperature,
                                     chunk_rows, backend or "")
    return _reduce(per_row.reshape(batch), keep, reduction)


# --------------------------------------------------------------------------------------------
# validation and reduction helpers


def _check_same_rows(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.dim() != b.dim():
        raise ValueError(
            f"rank mismatch: {a_name} {tuple(a.shape)} and {b_name} {tuple(b.shape)} must both "
            "be [*batch, ...] with the same batch dims"
        )
    if a.shape[:-1] != b.shape[:-1]:
        raise ValueError(
            f"batch shapes differ: {a_name} {tuple(a.shape)} vs {b_name} {tuple(b.shape)}"
        )


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _keep_rows(labels: Optional[Tensor], ignore_index: int, batch: torch.Size) -> Optional[Tensor]:
    """``[N]`` bool mask of the rows that count, or None when every row counts."""
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != batch:
        raise ValueError(
            f"labels must have the batch shape {tuple(batch)} of the logits, got "
            f"{tuple(labels.shape)}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    return (labels != ignore_index).reshape(-1)


def _reduce(per_row: Tensor, keep: Optional[Tensor], reduction: str) -> Tensor:
    if reduction == "none":
        return per_row
    return _reduce_total(per_row.sum(), keep, per_row.numel(), reduction)


def _reduce_total(total: Tensor, keep: Optional[Tensor], n: int, reduction: str) -> Tensor:
    """``"sum"``: the total over kept rows; ``"mean"``: divided by their count (0 if none)."""
    if reduction == "sum":
        return total
    if keep is None:
        return total / max(n, 1)
    return total / keep.sum().clamp(min=1).to(total.dtype)
