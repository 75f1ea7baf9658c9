"""The unfused baseline of the kernel benchmarks: ``draft_uncertainty`` as an eager PyTorch
composite (the reference formulas of :mod:`epikern.backends.reference` in float32), and the same
composite under ``torch.compile``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from epikern.backends import reference


def composite(draft: Tensor, target: Optional[Tensor], weights: Tensor, temperature: float = 1.0,
              decompose: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``draft [K, N, V]``, ``target [N, V]`` → ``(stats [6, N], draft_lse [K, N], target_lse [N])``
    computed op by op in float32 (every intermediate is materialised)."""
    return reference.draft_uncertainty(draft, target, weights, temperature, decompose,
                                       dtype=torch.float32)


def compiled_composite():
    """:func:`composite` under ``torch.compile`` (static shapes): the fused-by-the-compiler baseline."""
    return torch.compile(composite, dynamic=False)
