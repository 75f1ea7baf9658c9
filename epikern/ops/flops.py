"""FLOP formulas of the epikern ops for ``torch.utils.flop_counter.FlopCounterMode``.

The counter cannot see into a custom op. Each op module declares its formulas with
:func:`flop_formula`; :func:`register_flop_formulas` registers them once
``torch.utils.flop_counter`` has been imported (a counter can only be active then). Importing it
ourselves would import triton with ``import epikern``, before a caller could switch on
``TRITON_INTERPRET``. A ``FlopCounterMode`` copies the registry when it is constructed, so the ops
register on their first call and :func:`epikern.eval.cost.count_flops` registers before it counts.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

_declared: dict[str, Callable[..., int]] = {}
_registered: set[str] = set()


def flop_formula(op_name: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Declare ``formula`` as the FLOP count of ``torch.ops.epikern.<op_name>`` (arguments as the
    counter passes them: shapes for tensors, plus ``out_shape``)."""
    def declare(formula: Callable[..., int]) -> Callable[..., int]:
        _declared[op_name] = formula
        return formula
    return declare


def register_flop_formulas() -> None:
    """Register every declared formula not yet registered (cheap no-op otherwise, or while
    ``torch.utils.flop_counter`` is not imported, or under ``torch.compile``)."""
    if len(_registered) == len(_declared) or torch.compiler.is_compiling() \
            or "torch.utils.flop_counter" not in sys.modules:
        return
    from torch.utils.flop_counter import register_flop_formula

    for name, formula in _declared.items():
        if name not in _registered:
            register_flop_formula(getattr(torch.ops.epikern, name))(formula)
            _registered.add(name)
