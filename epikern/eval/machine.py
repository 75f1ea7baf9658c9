"""Where a benchmark ran: the machine and the software versions, for every report (nothing timed).

:func:`machine_info` and :func:`versions` are the records ``report.json`` (``epikern bench``), the
``--json`` files of ``epikern bench kernels|speculative`` and the benchmark scripts share. The
kernel benchmark adds its own calibration (clock, exp/log cost) on top
(:func:`epikern.backends.cpu.calibration`).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["machine_info", "versions", "cpu_model"]


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name", else ``platform.processor()``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, subprocess.SubprocessError, StopIteration):
        return platform.processor() or platform.machine()


def _cpuinfo_mhz() -> Optional[float]:
    try:
        with open("/proc/cpuinfo") as f:
            return next(float(l.split(":")[1]) for l in f if l.startswith("cpu MHz"))
    except (OSError, StopIteration, ValueError):
        return None


def machine_info() -> dict:
    """The benchmark machine: CPU model, cores, torch threads, the 1-minute load average now, the
    OS, the CUDA devices and the Python and torch versions. Reads system files only."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "cpuinfo_mhz": _cpuinfo_mhz(),
            "loadavg_start": os.getloadavg()[0], "platform": platform.platform(),
            "gpus": ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                     if torch.cuda.is_available() else [])}


def _git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out + ("+dirty" if dirty else "")


def versions() -> dict:
    """Versions of Python, epikern (and its git commit when run from a checkout), the libraries the
    numbers depend on, and CUDA as torch was built with it (None on CPU builds)."""
    out: dict[str, Any] = {"python": platform.python_version()}
    for pkg in ("epikern", "torch", "transformers", "tokenizers", "safetensors", "numpy", "scipy",
                "scikit-learn", "matplotlib", "triton"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    out["epikern_git"] = _git_commit()
    return out
