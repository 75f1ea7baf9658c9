"""Triton backend (design §2, §7): fused ``draft_uncertainty`` kernels for CUDA GPUs.

Two paths (:mod:`.config` picks one from K, N, V): a row kernel (:mod:`.row`, many rows) and a
split-vocabulary path (:mod:`.split`, few rows). On CPU tensors the kernels run only under Triton's
interpreter, which must be switched on (``TRITON_INTERPRET=1``) before this package is imported,
because ``triton.jit`` decides at decoration time. ``EPIKERN_TRITON_PATH=row|split`` (and the other
overrides documented in :mod:`.config`) force a path at call time.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import BackendUnavailableError
from ..contract import OutputRows

NAME = "triton"

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR: Optional[BaseException] = exc
else:
    _IMPORT_ERROR = None


def check_available() -> None:
    """Raise :class:`BackendUnavailableError` when the ``triton`` package cannot be imported."""
    if _IMPORT_ERROR is not None:
        raise BackendUnavailableError(f"backend 'triton' needs the triton package: {_IMPORT_ERROR}")


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
    """Backend entry point of ``draft_uncertainty`` (contract: :mod:`epikern.backends.contract`)."""
    _launcher(draft_logits).draft_uncertainty_out(draft_logits, target_logits, weights, temperature,
                                                  decompose, stats, draft_lse, target_lse)


def draft_uncertainty_rows_out(
    draft_logits: Tensor,
    target_logits: Optional[Tensor],
    rows: OutputRows,
    weights: Tensor,
    decompose: bool,
    out: Tensor,
) -> None:
    """Backend entry point of ``draft_uncertainty_rows`` (contract: :mod:`epikern.backends.contract`)."""
    _launcher(draft_logits).draft_uncertainty_rows_out(draft_logits, target_logits, rows, weights,
                                                       decompose, out)


def _launcher(logits: Tensor):
    """The launch module, once the kernels are known to fit the tensors' device."""
    check_available()
    from . import launch

    if not logits.is_cuda and not launch.interpreted():
        raise BackendUnavailableError(
            f"backend 'triton' got tensors on {logits.device}, but its kernels were compiled "
            "for the GPU: TRITON_INTERPRET=1 must be set before epikern's Triton kernels are "
            "imported to run them on the CPU interpreter")
    return launch
from .forward_kl import forward_kl_backward_out, forward_kl_out  # noqa: E402,F401
