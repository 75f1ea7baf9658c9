"""``cpu`` backend: thin loader of the fused OpenMP kernels in ``epikern._cpu`` (csrc/cpu).

The kernels read fp32/fp16/bf16 logits in place through raw pointers with int64 element strides
(unit stride over the vocabulary) and write float32 outputs; they run on
``torch.get_num_threads()`` threads and release the GIL.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import BackendUnavailableError

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
        raise BackendUnavailableError(
            f"backend 'cpu' needs the compiled module epikern._cpu, which failed to import "
            f"({_IMPORT_ERROR}); run `pip install -e .` in the epikern checkout to build it"
        )


def _dtype_code(name: str, x: Tensor) -> int:
    try:
        return _DTYPE_CODES[x.dtype]
    except KeyError:
        raise TypeError(f"backend 'cpu' reads float32, float16 or bfloat16 {name}, got {x.dtype}") from None


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
) -> int:
    """:func:`draft_uncertainty_out` that returns the number of logit elements the kernel read.

    Shapes: ``draft_logits [K, N, V]``, ``target_logits [N, V]`` or None (unit stride over V, any
    strides over K and N), ``weights [K]``, ``stats [6, N]``,
    ``draft_lse [K, N]``, ``target_lse [N]`` float32 (any strides). The count is
    ``(K + has_target)·N·V`` per sweep: one sweep, two when ``decompose``.
    """
    check_available()
    K, N, V = draft_logits.shape
    if draft_logits.stride(2) != 1 and V > 1:
        raise ValueError(f"draft_logits needs unit stride over V, got strides {draft_logits.stride()}")
    if target_logits is not None and target_logits.stride(1) != 1 and V > 1:
        raise ValueError(f"target_logits needs unit stride over V, got strides {target_logits.stride()}")
    weights = weights.to(torch.float32).contiguous()  # K numbers
    for name, out in (("stats", stats), ("draft_lse", draft_lse), ("target_lse", target_lse)):
        if out.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {out.dtype}")
    has_p = target_logits is not None
    return _cpu.draft_uncertainty(
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
    )


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
    """Backend entry point of ``epikern::draft_uncertainty`` (contract: epikern/backends/__init__)."""
    draft_uncertainty_raw(draft_logits, target_logits, weights, temperature, decompose,
                          stats, draft_lse, target_lse)
