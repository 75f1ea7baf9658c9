"""``cuda`` backend: a thin loader of the compiled ``epikern._cuda`` module (csrc/cuda).

The module takes raw device pointers, element strides, dtype codes and a ``cudaStream_t``; this
file turns tensors into those, runs on the tensors' device and the current stream of that device,
and allocates the small workspace the split path needs (its size comes from the module's plan,
so nothing is allocated inside the kernels and a call can be captured in a CUDA graph).

``EPIKERN_CUDA_PATH`` (``auto``, ``split`` or ``cluster``) forces a kernel path for tests and
benchmarks; ``cluster`` raises ``ValueError`` where it cannot run (it needs sm_90+, rows that start
16-byte aligned, and a row that fits the shared memory of one thread-block cluster).
"""

from __future__ import annotations

import os
from functools import lru_cache
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from . import BackendUnavailableError
from .contract import OutputRows

NAME = "cuda"

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_PATHS = {"auto": 0, "split": 1, "cluster": 2}


@lru_cache(maxsize=None)
def _module() -> ModuleType:
    try:
        from .. import _cuda
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend 'cuda' is unavailable: importing epikern._cuda failed ({exc}); "
            "`pip install -e .` builds it when nvcc is found (EPIKERN_CUDA=0 skips it)"
        ) from exc
    return _cuda


def check_available() -> None:
    """Raise :class:`BackendUnavailableError` unless the module imports and a device is usable,
    both by torch and by the module's own CUDA runtime (a driver older than the runtime the module
    was built with shows it no device, while torch's may still run)."""
    module = _module()
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "backend 'cuda' needs a CUDA device: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})"
        )
    if module.device_count() == 0:
        raise BackendUnavailableError(
            "backend 'cuda' is unavailable: epikern._cuda sees no CUDA device although torch does "
            "(is the driver older than the CUDA runtime epikern._cuda was built with? rebuild it "
            "against this driver's CUDA, or let automatic selection use 'triton')"
        )


def forced_path() -> int:
    """The path code of ``EPIKERN_CUDA_PATH`` (default ``auto``)."""
    name = os.environ.get("EPIKERN_CUDA_PATH", "auto")
    if name not in _PATHS:
        raise ValueError(f"EPIKERN_CUDA_PATH must be one of {', '.join(_PATHS)}, got {name!r}")
    return _PATHS[name]


def _dtype_code(name: str, x: Tensor) -> int:
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"backend 'cuda' reads float32, float16 or bfloat16 {name}, got {x.dtype}")
    return _DTYPE_CODES[x.dtype]


def _problem(draft: Tensor, target: Optional[Tensor], decompose: bool,
             rows: Optional[OutputRows] = None) -> dict:
    """Keyword arguments shared by the module's plan and launch functions; with ``rows``, N is
    the output rows and the maps are passed (``draft_uncertainty_rows``)."""
    K, N, V = draft.shape
    if V > 1 and draft.stride(2) != 1:
        raise ValueError(f"draft_logits needs unit stride over V, got strides {draft.stride()}")
    if target is not None and V > 1 and target.stride(1) != 1:
        raise ValueError(f"target_logits needs unit stride over V, got strides {target.stride()}")
    code = _dtype_code("draft_logits", draft)
    return dict(
        draft=draft.data_ptr(), draft_dtype=code,
        draft_stride_k=draft.stride(0), draft_stride_n=draft.stride(1),
        target=0 if target is None else target.data_ptr(),
        target_dtype=code if target is None else _dtype_code("target_logits", target),
        target_stride_n=0 if target is None else target.stride(0),
        K=K, N=N if rows is None else rows.count, V=V, decompose=bool(decompose),
        **({} if rows is None else _row_maps(draft, target, rows)),
    )


def _row_maps(draft: Tensor, target: Optional[Tensor], rows: OutputRows) -> dict:
    """The module's keyword arguments for the maps (an absent map is the identity)."""
    def index(name: str, x: Optional[Tensor]) -> dict:
        return {} if x is None else {f"{name}_index": x.data_ptr(), f"{name}_index64": x.dtype == torch.int64}
    return dict(draft_rows=draft.shape[1], target_rows=0 if target is None else target.shape[0],
                inv_temperature=rows.inv_temperature.data_ptr(),
                inv_temperature_stride=rows.inv_temperature.stride(0),
                **index("draft", rows.draft), **index("target", rows.target))


def plan(draft_logits: Tensor, target_logits: Optional[Tensor], decompose: bool = True) -> dict:
    """How :func:`draft_uncertainty_out` would run these inputs (path, sizes, workspace bytes)."""
    with torch.cuda.device(draft_logits.device):
        return _module().draft_uncertainty_plan(
            **_problem(draft_logits, target_logits, decompose), path=forced_path())


def draft_uncertainty_out(
    draft_logits: Tensor,
    target_logits: Optional[Tensor],
    weights: Tensor,
    temperature: float,
    decompose: bool,
    stats: Tensor,
    draft_lse: Tensor,
    target_lse: Tensor,
) -> None:
    """Fill ``stats [6, N]``, ``draft_lse [K, N]`` and ``target_lse [N]`` (float32, unit stride
    over N) from ``draft_logits [K, N, V]`` and ``target_logits [N, V]`` or None (unit stride over
    V, any other strides) with float32 ``weights [K]``, on the current stream of their device."""
    K, N, _ = draft_logits.shape
    if N == 0:
        return
    for name, t in (("stats", stats), ("draft_lse", draft_lse)):
        if N > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} needs unit stride over N, got strides {t.stride()}")
    if N > 1 and target_lse.stride(0) != 1:
        raise ValueError(f"target_lse needs unit stride, got strides {target_lse.stride()}")
    _launch(draft_logits, _problem(draft_logits, target_logits, decompose), weights, temperature,
            (stats, draft_lse, target_lse))


def draft_uncertainty_rows_out(
    draft_logits: Tensor,
    target_logits: Optional[Tensor],
    rows: OutputRows,
    weights: Tensor,
    decompose: bool,
    out: Tensor,
) -> None:
    """Fill ``out [7 + K, N]`` (float32, unit stride over N) from the rows that the maps of
    ``rows`` select in ``draft_logits [K, R_d, V]`` and ``target_logits [R_t, V]``, read in place
    by the kernels of :func:`draft_uncertainty_out`, on the current stream of their device."""
    K, N = draft_logits.shape[0], rows.count
    if N == 0:
        return
    if N > 1 and out.stride(1) != 1:
        raise ValueError(f"out needs unit stride over N, got strides {out.stride()}")
    _launch(draft_logits, _problem(draft_logits, target_logits, decompose, rows), weights, 1.0,
            (out[:6], out[6: 6 + K], out[6 + K]))


def _launch(draft_logits: Tensor, problem: dict, weights: Tensor, temperature: float,
            outputs: tuple[Tensor, Tensor, Tensor]) -> None:
    """Plan, allocate the split path's workspace and enqueue ``problem`` on the current stream;
    ``outputs``: ``stats [6, N]``, ``draft_lse [K, N]``, ``target_lse [N]`` (unit stride over N)."""
    if weights.dtype != torch.float32 or weights.device != draft_logits.device:
        raise TypeError(f"weights must be float32 on {draft_logits.device}, "
                        f"got {weights.dtype} on {weights.device}")
    stats, draft_lse, target_lse = outputs
    device = draft_logits.device
    module = _module()
    path = forced_path()
    with torch.cuda.device(device):
        nbytes = module.draft_uncertainty_plan(**problem, path=path)["workspace"]
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None
        module.draft_uncertainty(
            **problem,
            weights=weights.data_ptr(), weights_stride=weights.stride(0),
            temperature=float(temperature),
            stats=stats.data_ptr(), stats_stride=stats.stride(0),
            draft_lse=draft_lse.data_ptr(), draft_lse_stride=draft_lse.stride(0),
            target_lse=target_lse.data_ptr(),
            workspace=0 if workspace is None else workspace.data_ptr(), workspace_bytes=nbytes,
            stream=torch.cuda.current_stream(device).cuda_stream,
            path=path,
        )
