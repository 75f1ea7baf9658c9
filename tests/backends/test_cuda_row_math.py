"""CPU check of the CUDA kernels' arithmetic (no GPU needed).

``cuda_row_math_host.cpp`` runs the shared row math (``csrc/include/epikern/cuda/row_math.h`` on
top of ``epikern/online_softmax.h``) in the order the CUDA split kernels use it: base-2 logits,
rows cut into spans, 8-wide chunks strided over emulated threads with a scalar tail, drafts in
groups of four, ordered merges, and the two-pass mixture of sweep 2. It is compiled here with the
system C++ compiler and compared with the float64 reference on the design §8 cases.
"""

from __future__ import annotations

import math
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from epikern.ops.draft_uncertainty import DraftUncertainty
from tests._cases import (KINDS, assert_close, assert_close_stats, assert_special_rows, make_logits,
                          reference_stats, special_rows)

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).with_name("cuda_row_math_host.cpp")
CXX = shutil.which("c++") or shutil.which("g++")


@pytest.fixture(scope="module")
def emulate(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler (c++ or g++) on PATH to build the host emulation")
    exe = tmp_path_factory.mktemp("cuda_row_math") / "emulate"
    build = subprocess.run(
        [CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc' / 'include'}",
         str(SOURCE), "-o", str(exe)],
        capture_output=True, text=True)
    if build.returncode != 0:
        pytest.fail(f"building the host emulation failed:\n{build.stderr}")

    def run(draft, target, weights=None, temperature=1.0, decompose=True, splits=3, threads=4):
        K, *batch, V = draft.shape
        N = math.prod(batch)
        w = [1.0 / K] * K if weights is None else list(weights)
        payload = struct.pack("<7if", K, N, V, target is not None, decompose, splits, threads,
                              temperature)
        payload += struct.pack(f"<{K}f", *w)
        payload += draft.float().reshape(K, N, V).contiguous().numpy().tobytes()
        if target is not None:
            payload += target.float().reshape(N, V).contiguous().numpy().tobytes()
        done = subprocess.run([str(exe)], input=payload, capture_output=True, check=True)
        out = torch.frombuffer(bytearray(done.stdout), dtype=torch.float32)
        assert out.numel() == 6 * N + K * N + N
        stats = out[: 6 * N].reshape(6, N)
        return DraftUncertainty(
            *(s.reshape(batch) for s in stats),
            draft_lse=out[6 * N: 6 * N + K * N].reshape(K, *batch),
            target_lse=out[6 * N + K * N:].reshape(batch))

    return run


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("V", [1000, 1023])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("K", [1, 2, 4, 7])
def test_matches_reference(emulate, K, kind, V, splits):
    g = _gen(V * 7 + K)
    draft = make_logits((K, 3, V), kind, generator=g)
    target = make_logits((3, V), kind, generator=g)
    assert_close_stats(emulate(draft, target, splits=splits), reference_stats(draft, target))


@pytest.mark.parametrize("temperature", [0.25, 2.5])
def test_temperature_and_zero_weight(emulate, temperature):
    g = _gen(3)
    draft = make_logits((4, 5, 777), "peaked", generator=g)
    target = make_logits((5, 777), "normal", generator=g)
    w = [0.5, 0.2, 0.0, 0.3]
    out = emulate(draft, target, weights=w, temperature=temperature)
    assert_close_stats(out, reference_stats(draft, target, w, temperature))


def test_low_precision_values(emulate):
    g = _gen(4)
    draft = make_logits((4, 3, 1024), "peaked", dtype=torch.bfloat16, generator=g)
    target = make_logits((3, 1024), "normal", dtype=torch.float16, generator=g)
    assert_close_stats(emulate(draft, target), reference_stats(draft, target))


@pytest.mark.parametrize("K", [1, 5])
def test_identical_drafts(emulate, K):
    g = _gen(5)
    draft = make_logits((1, 4, 1023), "peaked", generator=g).expand(K, -1, -1)
    target = make_logits((4, 1023), "normal", generator=g)
    out = emulate(draft, target)
    assert_close_stats(out, reference_stats(draft, target))
    assert out.jsd.abs().max() <= 1e-4
    assert_close("eu vs kl", out.eu, out.kl)


def test_no_target_and_no_decompose(emulate):
    g = _gen(6)
    draft = make_logits((9, 2, 3, 300), "normal", generator=g)  # three draft groups
    assert_close_stats(emulate(draft, None), reference_stats(draft, None))
    target = make_logits((2, 3, 300), "normal", generator=g)
    out = emulate(draft, target, decompose=False)
    assert_close_stats(out, reference_stats(draft, target, decompose=False))


def test_infinite_and_nan_rows(emulate):
    draft, target = special_rows(V=500)
    out = emulate(draft, target)
    assert_close_stats(out, reference_stats(draft, target))
    assert_special_rows(out)


@pytest.mark.parametrize("mass_first", [True, False], ids=["mass-first", "peak-first"])
@pytest.mark.parametrize("spread", [95.0, 120.0])
def test_masked_reference_past_the_flush(emulate, spread, mass_first):
    """Mass at an entry where the reference is −inf and a logit ``spread`` nats higher elsewhere.
    Mass first: the device exp flushes the rescale factor to 0 (below −87.3 nats) and 0·(c = +inf)
    would be NaN. Peak first, in the same 8-wide chunk: the entry's own e^{x−m} flushes to 0. eu is
    +inf either way (the float64 reference's value) and nothing is NaN."""
    V = 1000
    draft = make_logits((2, 3, V), "normal", generator=_gen(8))
    target = make_logits((3, V), "normal", generator=_gen(9))
    mass, peak = (1, V - 2) if mass_first else (V - 2, V - 3)
    draft[:, :, mass] = 0.0
    target[:, mass] = -math.inf
    draft[:, :, peak] = spread
    out = emulate(draft, target)
    assert torch.isposinf(reference_stats(draft, target)["eu"]).all()
    for field in ("eu", "jsd", "kl", "draft_entropy", "mixture_entropy", "target_entropy"):
        assert not getattr(out, field).isnan().any(), f"NaN in {field}"
    assert torch.isposinf(out.eu).all(), out.eu
