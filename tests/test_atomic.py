"""``epikern.atomic``: a writer SIGKILLed mid-write leaves the old file or the new one, never a torn
one, and its temporary file does not outlive the next write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from epikern.atomic import atomic_directory, atomic_open, write_atomic

ROOT = Path(__file__).resolve().parents[1]
OLD, NEW = b"o" * (4 << 20), b"n" * (4 << 20)


def _writer(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, env=env)


def _temporaries(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.tmp-*"))


def test_kill_between_two_halves_keeps_the_old_file(tmp_path):
    path = tmp_path / "data.bin"
    write_atomic(path, OLD)
    proc = _writer(f"""
        import sys, time
        from epikern.atomic import atomic_open
        with atomic_open({str(path)!r}, "wb") as f:
            f.write(b"n" * (2 << 20))
            f.flush()
            print("half", flush=True)
            time.sleep(60)
            f.write(b"n" * (2 << 20))
    """)
    assert proc.stdout.readline().strip() == b"half"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert path.read_bytes() == OLD
    torn = _temporaries(path)
    assert len(torn) == 1 and torn[0].stat().st_size == 2 << 20  # the half file, under its temporary name
    write_atomic(path, NEW)  # the next write removes the dead writer's temporary
    assert path.read_bytes() == NEW and not _temporaries(path)


def test_kill_at_random_moments_never_tears_the_file(tmp_path):
    path = tmp_path / "data.bin"
    write_atomic(path, OLD)
    for attempt in range(6):
        proc = _writer(f"""
            from epikern.atomic import write_atomic
            print("start", flush=True)
            i = 0
            while True:
                write_atomic({str(path)!r}, (b"n" if i % 2 == 0 else b"o") * (4 << 20))
                i += 1
        """)
        assert proc.stdout.readline().strip() == b"start"
        time.sleep(0.02 + 0.05 * attempt)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert path.read_bytes() in (OLD, NEW), f"torn file after kill {attempt}"
        assert len(_temporaries(path)) <= 1  # at most the killed writer's own: none accumulate
    write_atomic(path, OLD)
    assert not _temporaries(path)


def test_an_exception_in_the_block_leaves_the_target_untouched(tmp_path):
    path = tmp_path / "a.json"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("new")
            raise RuntimeError("boom")
    assert path.read_text() == "old" and not _temporaries(path)


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    path = tmp_path / "a.txt"
    live = tmp_path / f".a.txt.tmp-{os.getppid()}-abcd"  # the parent process runs
    live.write_text("in flight")
    write_atomic(path, "x")
    assert live.exists() and path.read_text() == "x"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "a", "a"):
            pass
    with pytest.raises(TypeError, match="str or bytes"):
        write_atomic(tmp_path / "a", 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_atomic(tmp_path / "missing" / "a", "x")


def test_atomic_directory_whole_and_merged(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not target.exists()  # nothing visible before the block ends
    assert (target / "config.json").read_text() == "{}"
    with atomic_directory(target) as tmp:  # already there (another writer finished first): kept
        (tmp / "config.json").write_text("other")
    assert (target / "config.json").read_text() == "{}"
    with atomic_directory(target, merge=True) as tmp:
        (tmp / "weights.bin").write_bytes(b"w")
        (tmp / "config.json").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights.bin"]
    assert (target / "config.json").read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "never") as tmp:
            (tmp / "x").write_text("x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
