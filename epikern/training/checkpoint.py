"""Training checkpoints: one safetensors file per run, written atomically, resumed exactly.

A checkpoint holds everything a run needs to continue bit for bit:

    tensors   model.<name>                every trainable parameter (requires_grad; tied ones once)
              optim.<i>.<key>             AdamW state of parameter i (exp_avg, exp_avg_sq, step)
              rank<r>.rng.torch           torch's CPU generator, per process
              rank<r>.rng.cuda.<d>        each CUDA device's generator (when CUDA is initialised)
              rank<r>.rng.numpy           numpy's MT19937 key
              rank<r>.gen.<name>          the run's own generators (e.g. the OSD noise stream)
    metadata  format, step, world_size, config (JSON of the whole recipe), optim_groups (AdamW
              param groups), rng (python's and numpy's scalar state per rank), losses (per step),
              frozen_sha256 (digest of the frozen parameters)

Frozen parameters (a draft's trunk copied from the target) are not stored: the recipe rebuilds them
from the target, and the digest proves on resume that they are the same bytes.

The data order is a pure function of ``(seed, step)`` (:class:`epikern.training.data.EpochSampler`),
so the step is its whole state. The file is written to a temporary name in the same directory,
fsynced and renamed over the old one (:mod:`epikern.atomic`): a kill at any moment leaves either the
old checkpoint or the new one, never a torn file (stale temporaries are ignored and removed on the
next write).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor, nn

from ..atomic import atomic_open
from ..models.loading import CheckpointError
from .config import config_diff

FORMAT = "epikern.training.checkpoint"
FORMAT_VERSION = 1
#: Test hook: ``step:N`` SIGKILLs the process after optimizer step N (1-based, after that step's
#: checkpoint if any); ``write:N`` SIGKILLs it halfway through writing its N-th checkpoint.
FAULT_ENV = "EPIKERN_TRAIN_FAULT"


@dataclass
class Checkpoint:
    """A loaded checkpoint (see the module docstring for the layout)."""

    path: Path
    step: int
    world_size: int
    config: dict
    model: dict[str, Tensor]
    optimizer: dict
    rng: list[dict]  #: per rank: {"torch", "cuda", "numpy", "python", "generators"}
    losses: list[float] = field(default_factory=list)
    frozen_sha256: str = ""


def save_checkpoint(path: Path, *, step: int, config: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                    rng: list[dict], losses: list[float]) -> None:
    """Write a checkpoint atomically (:mod:`epikern.atomic`); called by one process.

    Args:
        rng: one :func:`capture_rng` dict per process, rank order.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{n}": p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    state = optimizer.state_dict()
    optim_meta = {}
    for i, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{i}.{key}"] = value.detach().cpu().contiguous()
            else:
                optim_meta[f"{i}.{key}"] = value
    rng_meta = []
    for r, states in enumerate(rng):
        tensors[f"rank{r}.rng.torch"] = states["torch"]
        for d, s in enumerate(states["cuda"]):
            tensors[f"rank{r}.rng.cuda.{d}"] = s
        tensors[f"rank{r}.rng.numpy"] = torch.from_numpy(states["numpy"][1].astype(np.int64))
        for name, s in states["generators"].items():
            tensors[f"rank{r}.gen.{name}"] = s
        rng_meta.append({"python": states["python"], "numpy": [states["numpy"][0], *states["numpy"][2:]],
                         "generators": sorted(states["generators"]), "cuda": len(states["cuda"])})
    metadata = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "step": str(step),
        "world_size": str(len(rng)), "config": json.dumps(config, sort_keys=True),
        "optim_groups": json.dumps(state["param_groups"]), "optim_scalars": json.dumps(optim_meta),
        "rng": json.dumps(rng_meta), "losses": json.dumps(losses), "frozen_sha256": frozen_digest(model),
    }
    _write(path, save_bytes(tensors, metadata=metadata))


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: no file at ``path``; a truncated or corrupt file; not an epikern training
            checkpoint (each message names the file and what is wrong).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: nothing to resume (run without --resume to start)")
    data = path.read_bytes()
    try:
        tensors = load_bytes(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({len(data)} bytes): {exc}; "
                              "it was left untouched") from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an epikern training checkpoint (format={metadata.get('format')!r})")
    try:
        rng_meta = json.loads(metadata["rng"])
        rng = []
        for r, meta in enumerate(rng_meta):
            key = tensors[f"rank{r}.rng.numpy"].numpy().astype(np.uint32)
            rng.append({
                "torch": tensors[f"rank{r}.rng.torch"],
                "cuda": [tensors[f"rank{r}.rng.cuda.{d}"] for d in range(meta["cuda"])],
                "numpy": (meta["numpy"][0], key, *meta["numpy"][1:]),
                "python": _python_state(meta["python"]),
                "generators": {name: tensors[f"rank{r}.gen.{name}"] for name in meta["generators"]},
            })
        optim_state: dict = {}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, i, key = name.split(".", 2)
                optim_state.setdefault(int(i), {})[key] = value
        for name, value in json.loads(metadata["optim_scalars"]).items():
            i, key = name.split(".", 1)
            optim_state.setdefault(int(i), {})[key] = value
        return Checkpoint(
            path=path, step=int(metadata["step"]), world_size=int(metadata["world_size"]),
            config=json.loads(metadata["config"]),
            model={n[len("model."):]: t for n, t in tensors.items() if n.startswith("model.")},
            optimizer={"state": optim_state, "param_groups": json.loads(metadata["optim_groups"])},
            rng=rng, losses=json.loads(metadata["losses"]), frozen_sha256=metadata["frozen_sha256"],
        )
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete: {type(exc).__name__}: {exc}") from exc


def check_resumable(ckpt: Checkpoint, config: dict, world_size: int, generators: bool) -> None:
    """Refuse to continue a checkpoint of a different run.

    Raises:
        CheckpointError: the recipe config differs (names every differing field with both values);
            the number of processes differs while the run has per-process noise streams.
    """
    diffs = config_diff(ckpt.config, config)
    if diffs:
        raise CheckpointError(
            f"cannot resume {ckpt.path}: it was written with a different config ({len(diffs)} field"
            f"{'s' if len(diffs) > 1 else ''} differ: {'; '.join(diffs)}). Resume with the checkpoint's "
            "settings, or start a new run in another --out directory."
        )
    if generators and ckpt.world_size != world_size:
        raise CheckpointError(
            f"cannot resume {ckpt.path} exactly: it was written by {ckpt.world_size} process(es) with "
            f"per-process noise streams, and this run has {world_size}; resume with {ckpt.world_size}"
        )


def load_model_state(model: nn.Module, ckpt: Checkpoint) -> None:
    """Copy the checkpointed trainable parameters into ``model`` and check its frozen ones.

    Raises:
        CheckpointError: missing, unexpected or mis-shaped parameters (names them); frozen
            parameters whose bytes differ from those the checkpoint was trained with.
    """
    state, path = ckpt.model, ckpt.path
    if frozen_digest(model) != ckpt.frozen_sha256:
        raise CheckpointError(f"cannot resume {path}: the frozen weights (e.g. the trunk taken from the target) "
                              "differ from those it was trained with; was the target changed?")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    wrong = [n for n in params if n in state and state[n].shape != params[n].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {[(n, tuple(state[n].shape), tuple(params[n].shape)) for n in wrong[:5]]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def frozen_digest(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``model``'s frozen parameters."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            t = p.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def capture_rng(generators: dict[str, torch.Generator]) -> dict:
    """This process's RNG states: torch (CPU and CUDA), numpy, python and the run's generators."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": list(cuda), "numpy": np.random.get_state(),
            "python": random.getstate(), "generators": {n: g.get_state() for n, g in generators.items()}}


def restore_rng(states: dict, generators: dict[str, torch.Generator]) -> None:
    """Inverse of :func:`capture_rng` (the run's generators must have the same names)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if set(states["generators"]) != set(generators):
        raise CheckpointError(f"checkpoint generators {sorted(states['generators'])} differ from the run's "
                              f"{sorted(generators)}")
    for name, g in generators.items():
        g.set_state(states["generators"][name])


def fault(kind: str, count: int) -> None:
    """SIGKILL this process if ``$EPIKERN_TRAIN_FAULT`` is ``f"{kind}:{count}"`` (tests only)."""
    if os.environ.get(FAULT_ENV) == f"{kind}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


_writes = 0


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`epikern.atomic.atomic_open`), in two halves so
    that the ``write:N`` fault can kill the process between them."""
    global _writes
    _writes += 1
    with atomic_open(path, "wb") as f:
        half = len(data) // 2
        f.write(data[:half])
        f.flush()
        fault("write", _writes)
        f.write(data[half:])


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors byte string (its JSON header)."""
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError(f"header length {n} does not fit a file of {len(data)} bytes")
    return json.loads(data[8:8 + n]).get("__metadata__", {})


def _python_state(state: list) -> tuple:
    """``random.getstate()`` from its JSON form (lists back to tuples)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


__all__ = ["Checkpoint", "CheckpointError", "FAULT_ENV", "capture_rng", "check_resumable", "frozen_digest",
           "load_checkpoint", "load_model_state", "restore_rng", "save_checkpoint"]
