"""``cpu`` backend: thin loader of the fused OpenMP kernels in ``epikern._cpu`` (csrc/cpu).

The kernels read fp32/fp16/bf16 logits in place through raw pointers with int64 element strides
(unit stride over the vocabulary) and write float32 outputs; they run on
``torch.get_num_threads()`` threads and release the GIL. The module holds one variant of the
kernels per instruction set (x86-64: ``baseline``, ``avx2``, ``avx512``) and runs the best one the
CPU supports, or the one ``EPIKERN_CPU_ISA`` names (:func:`isa_summary`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import BackendUnavailableError
from .contract import OutputRows

NAME = "cpu"

#: dtype codes of csrc/cpu/dtype.h
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

try:
    from .. import _cpu
except ImportError as exc:  # not built, or built for another Python / CPU
    _cpu = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def check_available() -> None:
    """Raise :class:`BackendUnavailableError` when the compiled module cannot be imported."""
    if _cpu is None:
        # a forced ISA this CPU lacks says so itself; otherwise the module is missing or stale
        hint = "" if "EPIKERN_CPU_ISA" in _IMPORT_ERROR else (
            "; run `pip install -e .` in the epikern checkout to build it")
        raise BackendUnavailableError(
            f"backend 'cpu' needs the compiled module epikern._cpu, which failed to import "
            f"({_IMPORT_ERROR}){hint}"
        )


def calibration() -> dict:
    """What ``epikern bench kernels``' cycle and floor columns are computed from, measured by the
    compiled module on this machine: the clock (a timed chain of dependent integer adds), the
    float lanes of the chosen ISA's SIMD code, and the cost per element of its vectorised exp2 and
    log2 on one core (data in L1)."""
    check_available()
    t_exp, t_log = _cpu._transcendental_seconds()
    return {"clock_hz": _cpu._clock_hz(), "simd_lanes": _cpu._simd_width,
            "exp_ns": t_exp * 1e9, "log_ns": t_log * 1e9}


def isa_summary() -> str:
    """Which instruction-set variant of the kernels runs and why, in one line."""
    check_available()
    isa = _cpu.isa()
    flags = _cpu.isa_flags[isa] or "the compiler's default target"
    return (f"ISA {isa} ({flags}); built: {', '.join(_cpu.isas)}; this CPU runs: "
            f"{', '.join(_cpu.supported_isas())}; EPIKERN_CPU_ISA=<name> forces one")


def _dtype_code(name: str, x: Tensor) -> int:
    try:
        return _DTYPE_CODES[x.dtype]
    except KeyError:
        raise TypeError(f"backend 'cpu' reads float32, float16 or bfloat16 {name}, got {x.dtype}") from None


class KernelWork(NamedTuple):
    """What one ``draft_uncertainty`` call did: logit elements read (``(K + has_target)·N·V`` in
    sweep 1, the same less the drafts with weight 0 in sweep 2) and the exponentials and
    logarithms evaluated in its vector loops (per element; the per-block rescales are not
    counted). With the split, ``(K + 1)·N·V`` exponentials and ``N·V`` logarithms when sweep 1
    keeps its exponentials (a redone block adds its length again), ``K·N·V`` more when not."""

    read: int
    exps: int
    logs: int


def draft_uncertainty_raw(
    draft_logits: Tensor,
    target_logits: Optional[Tensor],
    weights: Tensor,
    temperature: float,
    decompose: bool,
    stats: Tensor,
    draft_lse: Tensor,
    target_lse: Tensor,
    num_threads: Optional[int] = None,
    keep_bytes: int = -1,
) -> KernelWork:
    """:func:`draft_uncertainty_out` that returns the kernel's :class:`KernelWork`.

    Shapes: ``draft_logits [K, N, V]``, ``target_logits [N, V]`` or None (unit stride over V, any
    strides over K and N), ``weights [K]``, ``stats [6, N]``, ``draft_lse [K, N]``,
    ``target_lse [N]`` float32 (any strides). ``keep_bytes``: budget for the exponentials that
    sweep 1 keeps for the mixture sweep (4 bytes per draft with a nonzero weight and vocabulary
    entry, of one row, or of all rows when few rows split the vocabulary across threads); ``-1``
    is the kernel's default (8 MiB), ``0`` never keeps (sweep 2 then takes one exponential per
    draft and entry). The results agree within float32 rounding either way.
    """
    check_available()
    K, N, V = draft_logits.shape
    _unit_vocab_stride("draft_logits", draft_logits)
    _unit_vocab_stride("target_logits", target_logits)
    weights = weights.to(torch.float32).contiguous()  # K numbers (no copy when they are already)
    for name, out in (("stats", stats), ("draft_lse", draft_lse), ("target_lse", target_lse)):
        if out.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {out.dtype}")
    has_p = target_logits is not None
    return KernelWork(*_cpu.draft_uncertainty(
        draft_logits.data_ptr(), _dtype_code("draft_logits", draft_logits), K, N, V,
        draft_logits.stride(0), draft_logits.stride(1),
        target_logits.data_ptr() if has_p else 0,
        _dtype_code("target_logits", target_logits) if has_p else 0,
        target_logits.stride(0) if has_p else 0,
        weights.data_ptr(), float(temperature), bool(decompose),
        stats.data_ptr(), stats.stride(0), stats.stride(1),
        draft_lse.data_ptr(), draft_lse.stride(0), draft_lse.stride(1),
        target_lse.data_ptr(), target_lse.stride(0),
        torch.get_num_threads() if num_threads is None else int(num_threads),
        int(keep_bytes),
    ))


def _unit_vocab_stride(name: str, x: Optional[Tensor]) -> None:
    if x is not None and x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(f"{name} needs unit stride over V, got strides {x.stride()}")


def draft_uncertainty_out(
    draft_logits: Tensor,
    target_logits: Optional[Tensor],
    weights: Tensor,
    temperature: float,
    decompose: bool,
    stats: Tensor,
    draft_lse: Tensor,
    target_lse: Tensor,
) -> None:
    """Backend entry point of ``epikern::draft_uncertainty`` (contract: :mod:`epikern.backends.contract`)."""
    draft_uncertainty_raw(draft_logits, target_logits, weights, temperature, decompose,
                          stats, draft_lse, target_lse)


def draft_uncertainty_rows_out(
    draft_logits: Tensor,
    target_logits: Optional[Tensor],
    rows: OutputRows,
    weights: Tensor,
    decompose: bool,
    out: Tensor,
) -> None:
    """Backend entry of ``epikern::draft_uncertainty_rows``: the kernel of
    :func:`draft_uncertainty_out` reading its rows through the maps in place (no gather)."""
    check_available()
    K, R_d, V = draft_logits.shape
    _unit_vocab_stride("draft_logits", draft_logits)
    _unit_vocab_stride("target_logits", target_logits)
    if out.dtype != torch.float32:
        raise TypeError(f"out must be float32, got {out.dtype}")
    has_p = target_logits is not None
    weights = weights.to(torch.float32).contiguous()
    inv_t = rows.inv_temperature
    _cpu.draft_uncertainty_rows(
        draft_logits.data_ptr(), _dtype_code("draft_logits", draft_logits), K, R_d, V,
        draft_logits.stride(0), draft_logits.stride(1),
        target_logits.data_ptr() if has_p else 0,
        _dtype_code("target_logits", target_logits) if has_p else 0,
        target_logits.shape[0] if has_p else 0, target_logits.stride(0) if has_p else 0,
        *_index(rows.draft), *_index(rows.target), rows.count,
        inv_t.data_ptr(), inv_t.stride(0), weights.data_ptr(), bool(decompose),
        out.data_ptr(), out.stride(0), out.stride(1), torch.get_num_threads(),
    )


def _index(index: Optional[Tensor]) -> tuple[int, bool]:
    """(pointer, is int64) of a row map; (0, False) for the identity."""
    return (0, False) if index is None else (index.data_ptr(), index.dtype == torch.int64)


# --- forward_kl (issue 5) -------------------------------------------------------------------------

def _rows_with_unit_stride(name: str, x: Tensor) -> None:
    if x.dim() != 2 or (x.stride(1) != 1 and x.shape[1] > 1):
        raise ValueError(f"{name} must be [N, V] with unit stride over V, got shape "
                         f"{tuple(x.shape)} and strides {x.stride()}")


def _float32_vector(name: str, x: Tensor, n: int) -> None:
    if x.dtype != torch.float32 or x.shape != (n,) or (n > 1 and x.stride(0) != 1):
        raise TypeError(f"{name} must be a contiguous float32 [{n}] tensor, got {x.dtype} "
                        f"{tuple(x.shape)} with strides {x.stride()}")


def forward_kl_out(
    student: Tensor,
    teacher: Tensor,
    keep: Optional[Tensor],
    temperature: float,
    loss: Tensor,
    student_lse: Tensor,
    teacher_lse: Tensor,
) -> None:
    """Backend entry of ``epikern::forward_kl``: ``[N, V]`` fp32/fp16/bf16 rows → float32 ``[N]``.

    ``loss = KL(softmax(t/T) ‖ softmax(s/T))``, ``student_lse``, ``teacher_lse`` per row (zeros
    where ``keep [N]`` (bool) is False; rows not kept are not read).
    """
    check_available()
    N, V = student.shape
    _rows_with_unit_stride("student", student)
    _rows_with_unit_stride("teacher", teacher)
    for name, out in (("loss", loss), ("student_lse", student_lse), ("teacher_lse", teacher_lse)):
        _float32_vector(name, out, N)
    if keep is not None:
        keep = keep.to(torch.bool).contiguous()
    _cpu.forward_kl(
        student.data_ptr(), _dtype_code("student", student), student.stride(0),
        teacher.data_ptr(), _dtype_code("teacher", teacher), teacher.stride(0), N, V,
        0 if keep is None else keep.data_ptr(), float(temperature),
        loss.data_ptr(), student_lse.data_ptr(), teacher_lse.data_ptr(), torch.get_num_threads(),
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
    """Backend entry of ``epikern::forward_kl_backward``.

    ``grad_student [N, V]`` (the student's dtype, unit stride over V; may alias ``student``) =
    ``grad_loss[n] · (softmax(s/T) − softmax(t/T)) / T``; rows with ``grad_loss = 0`` are zeros.
    """
    check_available()
    N, V = student.shape
    _rows_with_unit_stride("student", student)
    _rows_with_unit_stride("teacher", teacher)
    _rows_with_unit_stride("grad_student", grad_student)
    if grad_student.dtype != student.dtype or grad_student.shape != student.shape:
        raise TypeError(f"grad_student must be {student.dtype} {tuple(student.shape)}, got "
                        f"{grad_student.dtype} {tuple(grad_student.shape)}")
    grad_loss = grad_loss.to(torch.float32).contiguous()
    for name, x in (("grad_loss", grad_loss), ("student_lse", student_lse),
                    ("teacher_lse", teacher_lse)):
        _float32_vector(name, x, N)
    _cpu.forward_kl_backward(
        grad_loss.data_ptr(), student.data_ptr(), _dtype_code("student", student),
        student.stride(0), teacher.data_ptr(), _dtype_code("teacher", teacher), teacher.stride(0),
        N, V, student_lse.data_ptr(), teacher_lse.data_ptr(), float(temperature),
        grad_student.data_ptr(), grad_student.stride(0), torch.get_num_threads(),
    )
