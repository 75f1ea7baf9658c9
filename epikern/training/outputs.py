"""Output directories of the training commands: claim one, resume one, write into it atomically.

Every command writes ``recipe.json`` (its whole config) first and its results last, each file through
a temporary name, fsync and rename (:mod:`epikern.atomic`), so a kill leaves complete files only. A
directory that already holds a run is never written over: without ``resume`` it is refused, with
``resume`` its ``recipe.json`` must equal the new config (the differing fields are named).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..atomic import atomic_directory, atomic_open, write_atomic
from ..models.loading import CheckpointError
from .config import config_diff
from .distributed import Distributed

RECIPE_NAME = "recipe.json"


def claim(out: Path, recipe: dict, *, resume: bool, dist: Optional[Distributed] = None) -> Path:
    """Make ``out`` this run's directory: every process checks, then rank 0 writes ``recipe.json``.

    Raises:
        CheckpointError: ``out`` holds files but ``resume`` is False (nothing is touched); ``resume``
            on a directory without ``recipe.json``; ``resume`` with a different config (names the
            differing fields).
    """
    out = Path(out)
    saved_path = out / RECIPE_NAME
    if resume:
        if not saved_path.is_file():
            raise CheckpointError(f"--resume: {out} holds no run to resume (no {RECIPE_NAME}); "
                                  "run without --resume to start one")
        try:
            saved = json.loads(saved_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"--resume: {saved_path} is corrupt ({exc}); it was left untouched") from exc
        diffs = config_diff(saved, recipe)
        if diffs:
            raise CheckpointError(f"cannot resume {out}: it was started with a different config "
                                  f"({'; '.join(diffs)}). Resume with its settings, or use another --out.")
        return out
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} already holds files (a previous run?); nothing was changed. Pass --resume "
                              "to continue that run, or choose an empty --out directory")
    if dist is not None:
        dist.barrier()  # every process has looked before rank 0 writes
    if dist is None or dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(saved_path, recipe)
    if dist is not None:
        dist.barrier()
    return out


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically and durably (:mod:`epikern.atomic`)."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows) -> None:
    """Write one JSON object per line, atomically and durably (:mod:`epikern.atomic`)."""
    with atomic_open(path) as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def save_pretrained(obj, out: Path, tokenizer=None) -> None:
    """``obj.save_pretrained`` (an HF model or a DraftEnsemble) into ``out`` file by file atomically:
    everything is written to a temporary directory first, fsynced, then each file is renamed into
    place (:func:`epikern.atomic.atomic_directory`)."""
    with atomic_directory(out, merge=True) as tmp:
        obj.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
