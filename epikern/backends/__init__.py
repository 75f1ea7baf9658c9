"""Backend registry and selection (design §2).

A backend is a module exposing ``NAME``, ``check_available()`` (raises
:class:`BackendUnavailableError` saying why not) and, per op it implements, an out-variant entry
point such as ``draft_uncertainty_out``, as :mod:`epikern.backends.contract` writes down.
Selection order, unless ``backend=`` or the ``EPIKERN_BACKEND`` environment variable names one:
CUDA tensors → ``cuda``, else ``triton``, else ``torch``; CPU tensors → ``cpu``, else ``torch``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache
from types import ModuleType
from typing import Optional

import torch

_MODULES = {
    "cuda": "epikern.backends.cuda",
    "triton": "epikern.backends.triton",
    "cpu": "epikern.backends.cpu",
    "torch": "epikern.backends.reference",
}
BACKENDS = tuple(_MODULES)
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here; the message says why."""


@lru_cache(maxsize=None)
def _load(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:  # a missing compiled module or dependency
        raise BackendUnavailableError(f"backend {name!r} failed to import: {exc}") from exc
    module.check_available()
    return module


def get(name: str) -> ModuleType:
    """The backend module ``name``, or :class:`BackendUnavailableError` with the reason."""
    return _load(name)


def is_available(name: str) -> bool:
    try:
        _load(name)
    except BackendUnavailableError:
        return False
    return True


def _entry(module: ModuleType, op: str):
    fn = getattr(module, f"{op}_out", None)
    if fn is None:
        raise BackendUnavailableError(f"backend {module.NAME!r} does not implement {op}")
    return fn


def select(op: str, device: torch.device, requested: Optional[str] = None) -> str:
    """Name of the backend that runs ``op`` on ``device``.

    An explicit request (argument, then ``EPIKERN_BACKEND``) must be usable or this raises
    :class:`BackendUnavailableError`; automatic selection falls back down the order above and
    warns once when the preferred compiled backend is missing.
    """
    requested = requested or os.environ.get("EPIKERN_BACKEND") or None
    kind = "cuda" if device.type == "cuda" else "cpu"
    if requested is not None:
        _check_device(requested, device)
        _entry(get(requested), op)
        return requested
    reasons = []
    for name in _AUTO_ORDER.get(kind, ("torch",)):
        try:
            _entry(get(name), op)
        except BackendUnavailableError as exc:
            reasons.append(str(exc))
            continue
        if reasons:
            _warn_fallback(op, kind, name, "; ".join(reasons))
        return name
    raise BackendUnavailableError(f"no backend can run {op} on {device}: {'; '.join(reasons)}")


def _check_device(name: str, device: torch.device) -> None:
    if name == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}")
    if name == "cpu" and device.type != "cpu":
        raise BackendUnavailableError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailableError(
            f"backend 'triton' needs CUDA tensors, got tensors on {device}; "
            "set TRITON_INTERPRET=1 (before importing epikern) to run it on the CPU interpreter"
        )


@lru_cache(maxsize=None)
def _warn_fallback(op: str, kind: str, chosen: str, why: str) -> None:
    warnings.warn(f"epikern: {op} on {kind} tensors falls back to backend {chosen!r} ({why})",
                  RuntimeWarning, stacklevel=3)


def entry(op: str, name: str):
    """The out-variant entry point of ``op`` in backend ``name``."""
    return _entry(get(name), op)
