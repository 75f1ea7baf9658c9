"""Host side of the Triton ``draft_uncertainty``: pick a configuration, allocate the workspace of
the split path, launch on the current stream of the tensors' device. No host synchronisation."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from ..contract import OutputRows
from . import config
from .row import draft_uncertainty_row_kernel
from .rows import draft_uncertainty_rows_kernel
from .split import split_finalize_kernel, split_mixture_kernel, split_states_kernel


def interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return isinstance(draft_uncertainty_row_kernel, InterpretedFunction)


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
    """Launch the row or split kernels (see :mod:`.config`) and write into the given outputs.

    ``draft_logits [K, N, V]`` and ``target_logits [N, V]`` (fp32/fp16/bf16, unit stride on V, any
    strides on K and N), ``weights [K]`` fp32; outputs ``stats [6, N]``, ``draft_lse [K, N]``,
    ``target_lse [N]`` fp32 (written through contiguous temporaries when they are strided).
    """
    K, N, V = draft_logits.shape
    cfg = config.choose(K, N, V, draft_logits.dtype)
    if N == 0:
        return
    outs = (stats, draft_lse, target_lse)
    dense = tuple(o if o.is_contiguous() else torch.empty_like(o, memory_format=torch.contiguous_format)
                  for o in outs)
    has_target = target_logits is not None
    target = target_logits if has_target else draft_logits
    stride_tn = target_logits.stride(0) if has_target else 0
    weights = weights.to(dtype=torch.float32).contiguous()
    inv_temp = 1.0 / float(temperature)
    sdk, sdn = draft_logits.stride(0), draft_logits.stride(1)
    with torch.cuda.device(draft_logits.device) if draft_logits.is_cuda else nullcontext():
        if cfg.path == "row":
            draft_uncertainty_row_kernel[(N,)](
                draft_logits, target, weights, *dense, N, V, K, sdk, sdn, stride_tn, inv_temp,
                K_PAD=cfg.k_pad, BLOCK_V=cfg.block_v, HAS_TARGET=has_target,
                DECOMPOSE=bool(decompose), num_warps=cfg.num_warps)
        else:
            _split(cfg, draft_logits, target, weights, dense, has_target, bool(decompose),
                   stride_tn, inv_temp)
    for out, tmp in zip(outs, dense):
        if out is not tmp:
            out.copy_(tmp)


def draft_uncertainty_rows_out(
    draft_logits: Tensor,
    target_logits: Optional[Tensor],
    rows: OutputRows,
    weights: Tensor,
    decompose: bool,
    out: Tensor,
) -> None:
    """Launch the rows kernel (:mod:`.rows`): one program per output row, the row path's tile
    configuration. ``out [7 + K, N]`` fp32 with unit stride over N."""
    K, R_d, V = draft_logits.shape
    N = rows.count
    if N == 0:
        return
    cfg = replace(config.choose(K, N, V, draft_logits.dtype), path="row", chunks=1)
    has_target = target_logits is not None
    target = target_logits if has_target else draft_logits
    # absent maps are never read (HAS_*MAP is false): any pointer will do
    draft_map = rows.draft if rows.draft is not None else rows.inv_temperature
    target_map = rows.target if rows.target is not None else rows.inv_temperature
    weights = weights.to(dtype=torch.float32).contiguous()
    with torch.cuda.device(draft_logits.device) if draft_logits.is_cuda else nullcontext():
        draft_uncertainty_rows_kernel[(N,)](
            draft_logits, target, draft_map, target_map, rows.inv_temperature, weights, out,
            R_d, target.shape[0] if has_target else 0, V, K,
            draft_logits.stride(0), draft_logits.stride(1), target.stride(0) if has_target else 0,
            rows.inv_temperature.stride(0), out.stride(0),
            K_PAD=cfg.k_pad, BLOCK_V=cfg.block_v, HAS_TARGET=has_target, DECOMPOSE=bool(decompose),
            HAS_DMAP=rows.draft is not None, HAS_TMAP=rows.target is not None,
            num_warps=cfg.num_warps)


def _split(cfg, draft, target, weights, dense, has_target, decompose, stride_tn, inv_temp):
    K, N, V = draft.shape
    C = cfg.chunks
    chunk_v = cfg.chunk_size(V)
    # one allocation: draft states [N, C, 4, K_PAD], target states [N, C, 4], mixture sums [N, C, 4]
    slots = N * C
    ws = torch.empty(slots * (4 * cfg.k_pad + 8), dtype=torch.float32, device=draft.device)
    ws_d = ws[: slots * 4 * cfg.k_pad]
    ws_t = ws[slots * 4 * cfg.k_pad: slots * (4 * cfg.k_pad + 4)]
    ws_m = ws[slots * (4 * cfg.k_pad + 4):]
    sdk, sdn = draft.stride(0), draft.stride(1)
    grid = (N * C,)
    split_states_kernel[grid](
        draft, target, ws_d, ws_t, V, K, C, chunk_v, sdk, sdn, stride_tn, inv_temp,
        K_PAD=cfg.k_pad, BLOCK_V=cfg.block_v, HAS_TARGET=has_target, num_warps=cfg.num_warps)
    if decompose:
        split_mixture_kernel[grid](
            draft, target, weights, ws_d, ws_t, ws_m, N, V, K, C, chunk_v, sdk, sdn, stride_tn,
            inv_temp, K_PAD=cfg.k_pad, BLOCK_V=cfg.block_v, CHUNK_BLOCK=cfg.chunk_block,
            HAS_TARGET=has_target, num_warps=cfg.num_warps)
    split_finalize_kernel[(N,)](
        weights, ws_d, ws_t, ws_m, *dense, N, K, C, K_PAD=cfg.k_pad, CHUNK_BLOCK=cfg.chunk_block,
        HAS_TARGET=has_target, DECOMPOSE=decompose, num_warps=config.FINALIZE_WARPS)

