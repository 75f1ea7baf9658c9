"""The backend contract: what a backend module provides, as ``typing.Protocol`` classes.

A backend is a module (``reference``, ``cpu``, ``cuda``, ``triton``) with a :class:`Backend`'s
``NAME`` and ``check_available()``, and per op it implements an out-variant entry point named
``<op>_out`` of the signature in :data:`ENTRY_POINTS` (``backends.entry(op, name)`` returns it).
Entry points get validated, flattened rows (unit stride over the vocabulary, any other strides;
float64 logits only on the ``torch`` backend), write every output element they are given, allocate
nothing the caller must free, and never synchronise with the host (so a CUDA call can be captured
in a graph). ``tests/backends/test_contract.py`` checks every backend module against this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Backend(Protocol):
    """A backend module."""

    NAME: str  #: the name ``backend=`` selects

    def check_available(self) -> None:
        """Raise :class:`epikern.backends.BackendUnavailableError` saying why it cannot run here."""


class DraftUncertaintyOut(Protocol):
    """``draft_uncertainty_out``: ``draft_logits [K, N, V]``, ``target_logits [N, V]`` or None,
    float32 ``weights [K]`` → float32 ``stats [6, N]`` (order of ``reference.STATS``),
    ``draft_lse [K, N]``, ``target_lse [N]``."""

    def __call__(self, draft_logits: Tensor, target_logits: Optional[Tensor], weights: Tensor,
                 temperature: float, decompose: bool, stats: Tensor, draft_lse: Tensor,
                 target_lse: Tensor) -> None: ...


class ForwardKLOut(Protocol):
    """``forward_kl_out``: ``student [N, V]``, ``teacher [N, V]``, ``keep [N]`` bool or None →
    ``loss``, ``student_lse``, ``teacher_lse`` ``[N]`` (zeros where not kept)."""

    def __call__(self, student: Tensor, teacher: Tensor, keep: Optional[Tensor], temperature: float,
                 loss: Tensor, student_lse: Tensor, teacher_lse: Tensor) -> None: ...


class ForwardKLBackwardOut(Protocol):
    """``forward_kl_backward_out``: ``grad_student [N, V] = grad_loss · (q − p) / T`` (rows with
    ``grad_loss = 0`` are zeros); ``grad_student`` may alias ``student``."""

    def __call__(self, grad_loss: Tensor, student: Tensor, teacher: Tensor, student_lse: Tensor,
                 teacher_lse: Tensor, temperature: float, grad_student: Tensor) -> None: ...


@dataclass(frozen=True)
class OutputRows:
    """What each of the N output rows of ``draft_uncertainty_rows`` reads, and at what temperature.

    Output row ``n`` reads draft row ``draft[n]`` of ``draft_logits [K, R_d, V]`` and target row
    ``target[n]`` of ``target_logits [R_t, V]`` at ``1/T = inv_temperature[n]``. A row is skipped
    (every output NaN, no logit read) when a map entry is negative (padding) or ``≥ R``, or when
    ``inv_temperature[n]`` is not finite and > 0.
    """

    draft: Optional[Tensor]  #: ``[N]`` int32/int64, contiguous; None: row n is draft row n
    target: Optional[Tensor]  #: ``[N]`` int32/int64, contiguous; None: row n is target row n
    inv_temperature: Tensor  #: ``[N]`` float32, any stride (0: one temperature for all rows)

    def __post_init__(self):
        for name, index in (("draft", self.draft), ("target", self.target)):
            if index is not None and (index.dtype not in (torch.int32, torch.int64)
                                      or index.dim() != 1 or (index.numel() > 1 and index.stride(0) != 1)):
                raise TypeError(f"OutputRows.{name} must be a contiguous 1-D int32 or int64 tensor, got "
                                f"{index.dtype} of shape {tuple(index.shape)} and strides {index.stride()}")

    @property
    def count(self) -> int:
        """N, the number of output rows."""
        return self.inv_temperature.shape[0]


class DraftUncertaintyRowsOut(Protocol):
    """``draft_uncertainty_rows_out``: ``draft_logits [K, R_d, V]``, ``target_logits [R_t, V]`` or
    None, the :class:`OutputRows` maps, float32 ``weights [K]`` → float32 ``out [7 + K, N]``
    (unit stride over N): rows 0-5 the stats of ``draft_uncertainty_out``, 6 … 5 + K
    ``draft_lse``, 6 + K ``target_lse``."""

    def __call__(self, draft_logits: Tensor, target_logits: Optional[Tensor], rows: OutputRows,
                 weights: Tensor, decompose: bool, out: Tensor) -> None: ...


#: The entry point of each op, by op name (``<op>_out`` in a backend module).
ENTRY_POINTS: dict[str, type] = {
    "draft_uncertainty": DraftUncertaintyOut,
    "draft_uncertainty_rows": DraftUncertaintyRowsOut,
    "forward_kl": ForwardKLOut,
    "forward_kl_backward": ForwardKLBackwardOut,
}
