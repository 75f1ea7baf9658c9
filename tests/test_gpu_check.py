"""``benchmarks/gpu_check.sh`` on a machine without a GPU: it refuses within seconds, and its
``--dry-run`` (the GPU steps stubbed) runs every step, prints the verdict table and exits 0, or
non-zero naming the failed step, after retrying a failed CUDA build without CUDA."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(tmp_path, *args, timeout, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OUT": str(tmp_path), **env})


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None or torch.cuda.is_available(),
                    reason="this machine has a GPU (or its driver)")
def test_without_a_gpu_it_stops_at_once(tmp_path):
    proc = _run(tmp_path, timeout=30)
    assert proc.returncode == 3
    assert "gpu_check: FAILED: no GPU: nvidia-smi not found" in proc.stderr


def test_dry_run_passes_with_a_verdict(tmp_path):
    proc = _run(tmp_path, "--dry-run", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    verdict = proc.stdout[proc.stdout.index("## gpu_check verdict"):]
    for line in ("| preflight | ok |", "| build (CUDA) | ok |", "| tests | ok |", "| bench | ok |",
                 "| test results | ok |", "% copy"):
        assert line in verdict, verdict
    assert verdict.rstrip().splitlines()[-1].startswith("gpu_check: PASSED")
    assert (tmp_path / "gpu_tests.xml").exists() and (tmp_path / "bench_gpu.json").exists()


def test_dry_run_failed_cuda_build_is_retried_and_fails_the_check(tmp_path):
    proc = _run(tmp_path, "--dry-run", timeout=300, GPU_CHECK_FAIL="build_cuda")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "== build: epikern._cpu only (EPIKERN_CUDA=0)" in proc.stdout
    verdict = proc.stdout[proc.stdout.index("## gpu_check verdict"):]
    assert "| build (CUDA) | FAIL |" in verdict and "| build (EPIKERN_CUDA=0) | ok |" in verdict
    assert "| tests | ok |" in verdict and "| bench | ok |" in verdict  # the rest still ran
    assert verdict.rstrip().splitlines()[-1].startswith("gpu_check: FAILED")
    assert "build (CUDA)" in verdict.rstrip().splitlines()[-1]
