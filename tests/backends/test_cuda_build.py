"""Build checks of ``epikern._cuda`` (need nvcc, not a GPU).

* The built module carries SASS for sm_80 and sm_90a and PTX for newer GPUs
  (``cuobjdump --list-elf`` / ``--list-ptx``; Triton ships a cuobjdump).
* Every ``csrc/cuda`` source compiles for sm_90a (whose image holds all device code; sm_80's is
  the same minus the cluster kernel's body) with ``-Werror all-warnings`` and host
  ``-Wall -Wextra -Werror``, and ptxas reports no stack frame and no spills for any kernel.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc")
CUDA_OFF = os.environ.get("EPIKERN_CUDA", "1") in ("0", "OFF", "off", "false", "no")

pytestmark = [
    pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: epikern._cuda is not built here"),
]


def _cuobjdump() -> str | None:
    try:
        import triton

        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if tool.exists():
            return str(tool)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def _module_path() -> str:
    spec = importlib.util.find_spec("epikern._cuda")
    assert spec is not None and spec.origin, (
        "nvcc is on PATH but epikern._cuda is not built; `pip install -e . --no-build-isolation` "
        "builds it (EPIKERN_CUDA=0 skips it on purpose)")
    return spec.origin


@pytest.mark.skipif(CUDA_OFF, reason="EPIKERN_CUDA=0: the CUDA module is skipped on purpose")
@pytest.mark.skipif(bool(os.environ.get("EPIKERN_CUDA_ARCHS")),
                    reason="EPIKERN_CUDA_ARCHS overrides the default sm_80;sm_90a;compute_90 images")
def test_module_has_sm80_sm90a_and_ptx():
    module = _module_path()
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither Triton's nor one on PATH)")
    elf = subprocess.run([tool, "--list-elf", module], capture_output=True, text=True, check=True)
    archs = set(re.findall(r"\.(sm_\d+a?)\.cubin", elf.stdout))
    assert {"sm_80", "sm_90a"} <= archs, f"ELF images of {module}:\n{elf.stdout}"
    ptx = subprocess.run([tool, "--list-ptx", module], capture_output=True, text=True, check=True)
    assert re.search(r"\.sm_90\.ptx", ptx.stdout), f"PTX of {module}:\n{ptx.stdout}"


def test_sources_compile_without_warnings_or_spills(tmp_path):
    import pybind11

    includes = [ROOT / "csrc" / "include", ROOT / "csrc" / "cuda", pybind11.get_include(),
                sysconfig.get_paths()["include"]]
    common = [NVCC, "-std=c++17", "-O3", "-arch=sm_90a", "-Xptxas=-v", "-Werror", "all-warnings",
              "--expt-relaxed-constexpr", "-Xcompiler=-fPIC,-Wall,-Wextra,-Werror",
              *(f"-I{p}" for p in includes), "-c"]
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources, "no CUDA sources found"
    jobs = [(src, subprocess.Popen([*common, str(src), "-o", str(tmp_path / f"{src.stem}.o")],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            for src in sources]
    kernels = 0
    for src, job in jobs:
        log, _ = job.communicate(timeout=600)
        assert job.returncode == 0, f"{src.name} does not compile cleanly:\n{log}"
        # Each kernel: "N bytes stack frame, N bytes spill stores, N bytes spill loads".
        for frame, stores, loads in re.findall(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log):
            kernels += 1
            assert (frame, stores, loads) == ("0", "0", "0"), f"{src.name} uses local memory:\n{log}"
    assert kernels >= 27, f"expected ptxas reports for the 27 kernels, got {kernels}"
