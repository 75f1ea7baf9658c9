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

from typing import Optional, Protocol, runtime_checkable

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


#: The entry point of each op, by op name (``<op>_out`` in a backend module).
ENTRY_POINTS: dict[str, type] = {
    "draft_uncertainty": DraftUncertaintyOut,
    "forward_kl": ForwardKLOut,
    "forward_kl_backward": ForwardKLBackwardOut,
}
