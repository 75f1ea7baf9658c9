"""Build epikern's compiled modules with CMake + Ninja (metadata lives in pyproject.toml).

    pip install -e . --no-build-isolation    # editable: epikern/_cpu*.so (and _cuda) in the tree
    pip install .                            # a regular install / wheel

``epikern._cpu`` (csrc/cpu, C++17 + OpenMP) is always built; ``epikern._cuda`` (csrc/cuda) is
built whenever CMake finds a CUDA compiler (nvcc), for SASS sm_80 + sm_90a and PTX compute_90.
The CMake build directory is ``build/cmake-<python tag>`` (kept between builds, so rebuilds are incremental).

Environment variables:

``EPIKERN_CPU_ARCH``
    Unset (default): the CPU kernels are compiled once per instruction set — on x86-64 for
    ``baseline`` (x86-64-v2), ``avx2`` (x86-64-v3: AVX2/FMA) and ``avx512`` (x86-64-v4) — into one
    module, which picks the best variant the CPU (and its OS) supports at import, so one wheel runs
    on any x86-64 CPU of the last decade at AVX-512 speed where there is AVX-512; on other
    architectures one variant for the compiler default. A ``-march`` value instead builds one
    variant (``custom``) with it, e.g. ``EPIKERN_CPU_ARCH=native`` for the build machine only.
``EPIKERN_CPU_ISA`` (at run time, not build time)
    ``baseline``, ``avx2`` or ``avx512`` forces that variant (import fails with the reason when the
    CPU lacks it); unset or ``auto``: the best. ``epikern backends`` says which runs.
``EPIKERN_SANITIZE``
    ``-fsanitize=`` value for the CPU module, e.g. ``address,undefined`` (built in its own
    ``build/cmake-<tag>-sanitize`` directory). The CPU kernel tests under ASan + UBSan, from the
    checkout (ASan's runtime must be loaded before Python's allocator runs, and libstdc++ with it
    or ASan's ``__cxa_throw`` interceptor aborts on the first C++ exception, hence ``LD_PRELOAD``;
    CPython's own allocations look like leaks, hence ``detect_leaks=0``)::

        EPIKERN_SANITIZE=address,undefined EPIKERN_CUDA=0 python setup.py build_ext --inplace
        LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)" \\
            ASAN_OPTIONS=detect_leaks=0 \\
            UBSAN_OPTIONS=print_stacktrace=1 PYTHONPATH=$PWD python -m pytest -q -p no:cacheprovider \\
            tests/backends/test_cpu_kernel.py tests/backends/test_cpu_isa.py
        EPIKERN_CUDA=0 python setup.py build_ext --inplace   # back to the regular module

``EPIKERN_CUDA=0``
    skip the CUDA module even if nvcc is found.
``EPIKERN_CUDA_ARCHS``
    ``CMAKE_CUDA_ARCHITECTURES`` of the CUDA module (default ``80-real;90a-real;90-virtual``).
``EPIKERN_BUILD_TYPE``
    CMake build type (default ``Release``).
``CMAKE_BUILD_PARALLEL_LEVEL``
    number of parallel compile jobs (Ninja's default otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources are built by the top-level CMakeLists.txt."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _ninja() -> str:
    """The ninja binary of the ``ninja`` pip package (a build requirement), else ninja on PATH."""
    try:
        import ninja

        path = Path(ninja.BIN_DIR) / "ninja"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return "ninja"


def _cmake() -> str:
    """The cmake binary of the ``cmake`` pip package (a build requirement), else cmake on PATH."""
    try:
        import cmake

        path = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return "cmake"


class CMakeBuild(build_ext):
    """Configure and build all CMake targets once; modules land next to ``epikern/__init__.py``."""

    def build_extensions(self) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath("epikern._cpu")).resolve().parent
        for ext in self.extensions:  # drop modules of an earlier build (e.g. _cuda, now skipped)
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
        # A fixed directory under build/ (setuptools' build_temp is a throw-away temp dir for
        # editable installs), so that rebuilds are incremental.
        sanitize = os.environ.get("EPIKERN_SANITIZE", "")
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}{'-sanitize' if sanitize else ''}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("EPIKERN_CUDA", "1") not in ("0", "OFF", "off", "false", "no")
        args = [
            f"-S{ROOT}",
            f"-B{build_dir}",
            "-GNinja",
            f"-DCMAKE_MAKE_PROGRAM={_ninja()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('EPIKERN_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DEPIKERN_OUTPUT_DIR={out_dir}",
            f"-DEPIKERN_CPU_ARCH={os.environ.get('EPIKERN_CPU_ARCH', '')}",
            f"-DEPIKERN_SANITIZE={sanitize}",
            f"-DEPIKERN_CUDA={'ON' if cuda else 'OFF'}",
        ]
        archs = os.environ.get("EPIKERN_CUDA_ARCHS")
        # -U drops a value cached by an earlier build, restoring the CMakeLists.txt default.
        args.append(f"-DEPIKERN_CUDA_ARCHS={archs}" if archs else "-UEPIKERN_CUDA_ARCHS")
        cmake = _cmake()
        subprocess.run([cmake, *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir)], check=True)
        # _cuda is optional: keep only the modules CMake produced, so that setuptools copies (for
        # editable installs) and packages exactly those.
        self.extensions = [e for e in self.extensions if Path(self.get_ext_fullpath(e.name)).exists()]


setup(
    ext_modules=[CMakeExtension("epikern._cpu"), CMakeExtension("epikern._cuda")],
    cmdclass={"build_ext": CMakeBuild},
)
