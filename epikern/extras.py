"""Optional dependencies: which pip extra provides which modules, and the error that says so.

The core install (``pip install epikern``: torch, numpy, triton on Linux x86-64) runs the kernels:
``draft_uncertainty``, ``ensemble_uncertainty``, ``forward_kl`` on every backend. The rest of the
package needs an extra (``pyproject.toml``); a subpackage that does calls :func:`require` before
importing it, so that a missing module fails with the command to run::

    require("models", "epikern.models")
    # ImportError: epikern.models needs transformers, safetensors: pip install "epikern[models]"

:func:`require` only looks the modules up (``importlib.util.find_spec``), it imports nothing.
"""

from __future__ import annotations

from importlib.util import find_spec

_MODELS = ("transformers", "safetensors", "tqdm")

#: extra → the top-level modules it installs (import names, not distribution names)
EXTRAS: dict[str, tuple[str, ...]] = {
    "models": _MODELS,
    "train": _MODELS,
    "eval": _MODELS + ("sklearn", "scipy", "matplotlib", "rich"),
    "real": _MODELS + ("gguf", "accelerate"),
    "vllm": ("vllm",),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def install_command(extra: str) -> str:
    """The pip command that installs ``extra``."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; choose one of {', '.join(EXTRAS)}")
    return f'pip install "epikern[{extra}]"'


def require(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` unless every module of ``extra`` is importable.

    ``feature`` names what needs them (a module, a command) in the message.
    """
    command = install_command(extra)
    missing = [name for name in EXTRAS[extra] if find_spec(name) is None]
    if missing:
        raise MissingExtraError(f"{feature} needs {', '.join(missing)}: {command}")
