"""``draft_uncertainty_rows`` on the Triton and CUDA backends: engine layouts against the dense op.

Without a GPU the Triton kernel runs on Triton's CPU interpreter (fp32/fp16 only: bf16 is silently
wrong in the interpreter); the tests marked ``gpu`` run the compiled kernels (Triton and CUDA, bf16
included), a CUDA-graph capture and a check that no call synchronises with the host.
"""

from __future__ import annotations

import pytest
import torch

import epikern as ek
from epikern.backends import contract, entry
from tests._layouts import LAYOUTS, assert_rows_match, dense_expected, make_layout

pytest.importorskip("triton")
pytestmark = [pytest.mark.triton,
              pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")]

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (compiled kernels)")
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def _run(layout, dtype, backend, device=DEVICE, seed=0, decompose=True):
    lay = make_layout(layout, K=3, V=131, dtype=dtype, seed=seed, device=device)
    temperature = 0.5 + torch.rand(lay.n, generator=torch.Generator().manual_seed(seed)).to(device)
    out = ek.draft_uncertainty_rows(lay.draft, lay.target, draft_rows=lay.draft_rows, target_rows=lay.target_rows,
                                    temperature=temperature, decompose=decompose, backend=backend)
    expected, keep = dense_expected(lay, 1 / temperature, "torch", decompose=decompose)
    assert_rows_match(out, expected, keep)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_layouts_match_the_dense_op(layout, dtype):
    _run(layout, dtype, "triton", seed=LAYOUTS.index(layout))


def test_triton_without_mixture_sweep_or_target():
    _run("vllm_v2", torch.float32, "triton", decompose=False)
    lay = make_layout("sglang", K=2, V=50, dtype=torch.float16, device=DEVICE)
    out = ek.draft_uncertainty_rows(lay.draft, None, backend="triton")
    dense = ek.draft_uncertainty(lay.draft, None, backend="torch")
    torch.testing.assert_close(out.jsd, dense.jsd, atol=1e-4, rtol=1e-4)
    assert bool(out.eu.isnan().all() and out.target_lse.isnan().all())


def test_triton_kernel_skips_out_of_range_entries_and_bad_temperatures():
    lay = make_layout("sglang", K=2, V=40, dtype=torch.float32, device=DEVICE)
    n = lay.n
    maps = torch.arange(n, dtype=torch.int32, device=DEVICE)
    maps[0] = n
    inv_t = torch.ones(n, device=DEVICE)
    inv_t[3] = float("inf")
    out = torch.empty(9, n, device=DEVICE)
    entry("draft_uncertainty_rows", "triton")(
        lay.draft, lay.target, contract.OutputRows(None, maps, inv_t), torch.full((2,), 0.5, device=DEVICE), True, out)
    assert bool(out[:, [0, 3]].isnan().all()) and not bool(out[:, 1].isnan().any())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_layouts_match_the_dense_op(backend, layout, dtype):
    _run(layout, dtype, backend, device="cuda", seed=LAYOUTS.index(layout))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_capture_without_host_sync(backend):
    """Capture one call (preallocated out, device maps and temperatures), replay it on new logits."""
    lay = make_layout("vllm_v2", K=3, V=32000, dtype=torch.bfloat16, device="cuda")
    temperature = torch.full((lay.n,), 0.8, device="cuda")
    out = torch.empty(10, lay.n, device="cuda")

    def call():
        ek.draft_uncertainty_rows(lay.draft, lay.target, draft_rows=lay.draft_rows, target_rows=lay.target_rows,
                                  temperature=temperature, weights=torch.full((3,), 1 / 3, device="cuda"),
                                  out=out, backend=backend)

    call()  # warm-up (compiles, selects the backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    lay.draft.copy_(torch.randn_like(lay.draft))
    graph.replay()
    torch.cuda.synchronize()
    expected, keep = dense_expected(lay, 1 / temperature, "torch")
    got = ek.DraftUncertainty(*out[:6], draft_lse=out[6:9], target_lse=out[9])
    assert_rows_match(got, expected, keep)
