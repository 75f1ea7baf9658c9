"""Atomic, durable file writes: a reader (or a process after a crash) sees the old file or the new one,
never a torn one.

The recipe, in one place for every writer of epikern (checkpoints, reports, JSON outputs, the
dequantised-model cache):

1. write to a temporary name **in the same directory** (``.<name>.tmp-<pid>-<random>``; the same
   file system, so the rename below is atomic);
2. ``fsync`` the temporary file (its bytes are on disk before its name is);
3. ``os.replace`` it over the target (atomic on POSIX and on Windows);
4. ``fsync`` the directory (the rename itself survives a power cut).

A writer killed before step 3 leaves only its temporary file; the next write to the same target
removes temporaries whose process is gone, so they never accumulate. Temporaries of a live process
(a concurrent writer) are left alone.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator, Union

__all__ = ["atomic_open", "write_atomic", "atomic_directory", "fsync_directory"]

PathLike = Union[str, os.PathLike]


def fsync_directory(directory: PathLike) -> None:
    """Make the entries of ``directory`` (a rename into it) durable; a no-op where directories
    cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def _remove_stale_temporaries(path: Path, directory: Path) -> None:
    """Delete the temporaries ``.<name>.tmp-<pid>-*`` of ``path`` in ``directory`` whose writer
    ``pid`` no longer runs."""
    prefix = _temp_prefix(path)
    for stale in directory.glob(prefix + "*"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _temporary_name(path: Path) -> Path:
    return path.parent / f"{_temp_prefix(path)}{os.getpid()}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO]:
    """``open(path, mode)`` whose content appears at ``path`` only when the block ends normally.

    Yields the temporary file; on a normal exit it is flushed, fsynced and renamed over ``path``
    (then the directory is fsynced). If the block raises, the temporary file is deleted and
    ``path`` is untouched. ``mode`` is ``"w"`` (text, ``encoding``) or ``"wb"``. The parent
    directory must exist.

    Example::

        with atomic_open(out / "rows.jsonl") as f:
            f.writelines(json.dumps(row) + "\\n" for row in rows)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the directory {path.parent} does not exist")
    _remove_stale_temporaries(path, path.parent)
    tmp = _temporary_name(path)
    try:
        with open(tmp, mode, encoding=None if mode == "wb" else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_atomic(path: PathLike, data: Union[str, bytes], encoding: str = "utf-8") -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically and durably (:func:`atomic_open`)."""
    if not isinstance(data, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"write_atomic writes str or bytes, got {type(data).__name__}")
    with atomic_open(path, "w" if isinstance(data, str) else "wb", encoding=encoding) as f:
        f.write(data)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_directory(dirpath)


@contextlib.contextmanager
def atomic_directory(path: PathLike, *, merge: bool = False) -> Iterator[Path]:
    """A temporary directory whose files appear in ``path`` only when the block ends normally.

    Yields an empty directory; on a normal exit every file in it is fsynced, then

    * ``merge=False``: the directory is renamed to ``path`` as a whole (readers see all of it or
      none). If ``path`` already exists (another process made it first), it is kept and what the
      block wrote is discarded;
    * ``merge=True``: ``path`` is created if needed and each top-level file is renamed into it
      (each file atomic; other files of ``path`` are kept).

    If the block raises, the temporary directory is deleted and ``path`` is untouched.
    """
    path = Path(path)
    parent = path if merge else path.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path, parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(path)}{os.getpid()}-", dir=parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if merge:
            for f in tmp.iterdir():
                os.replace(f, path / f.name)
        else:
            try:
                os.replace(tmp, path)
            except OSError:  # a non-empty directory is there already: another writer finished first
                if not path.is_dir():
                    raise
        fsync_directory(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
