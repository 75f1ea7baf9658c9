"""``ek.draft_uncertainty_rows``: :func:`~epikern.ops.draft_uncertainty` on the layouts engines keep.

A serving engine holds its logits as flat rows with index maps, not as ``[K, *batch, V]``: the
vLLM V1 rejection sampler gets target logits ``[num_draft_tokens + B, V]`` (request-major, one
bonus row after each request's draft rows) and ``target_logits_indices``; vLLM's V2 runner keeps
draft logits ``[max_reqs, γ, V]`` per request slot; SGLang verifies ``[B · draft_token_num, V]``.
Output row ``n`` of this op reads draft row ``draft_rows[n]`` of every draft and target row
``target_rows[n]`` in place (int32 or int64 maps; no ``[N, V]`` gather copy), at its own
temperature, and writes the same quantities as ``draft_uncertainty`` into one float32 buffer
``out [7 + K, N]`` (rows 0-5: eu, jsd, kl, draft_entropy, mixture_entropy, target_entropy;
6 … 5 + K: draft_lse; 6 + K: target_lse). Its shape depends on N and K only, it can be
preallocated, and no call synchronises with the host, so a call can be captured in a CUDA graph.
Map entries that are negative mark padding rows: every output of such a row is NaN.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import backends
from ..backends.contract import OutputRows
from ..backends.reference import STATS
from . import _checks, flops
from .draft_uncertainty import DraftUncertainty, draft_uncertainty_flops

INDEX_DTYPES = (torch.int32, torch.int64)


def packed_rows(num_drafts: int) -> int:
    """Rows of the packed output buffer for K drafts: 6 stats, K draft_lse, 1 target_lse."""
    return len(STATS) + num_drafts + 1


def _draft_uncertainty_rows(
    draft_logits: Tensor,
    target_logits: Optional[Tensor],
    draft_rows: Optional[Tensor],
    target_rows: Optional[Tensor],
    weights: Tensor,
    inv_temperature: Tensor,
    decompose: bool,
    backend: str,
    out: Tensor,
) -> None:
    """The registered op (one argument per schema field): ``draft_logits [K, R_d, V]``,
    ``target_logits [R_t, V]``, contiguous maps ``[N]``, float32 ``weights [K]`` and
    ``inv_temperature [N]`` → ``out [7 + K, N]``. ``backend`` (``""``: automatic) is resolved
    here, at run time, so that compiled graphs see one opaque call. Map entries past the rows are
    refused here for CPU maps; on an accelerator the check would synchronise, so the kernels skip
    such rows (NaN) instead."""
    name = backends.select("draft_uncertainty_rows", draft_logits.device, backend or None)
    _checks.check_reference_dtype(name, draft_logits=draft_logits, target_logits=target_logits)
    _check_in_range("draft_rows", draft_rows, "draft_logits", draft_logits.shape[1])
    if target_logits is not None:
        _check_in_range("target_rows", target_rows, "target_logits", target_logits.shape[0])
    _check_no_overlap(out, draft_logits=draft_logits, target_logits=target_logits, draft_rows=draft_rows,
                      target_rows=target_rows, weights=weights, temperature=inv_temperature)
    rows = OutputRows(draft_rows, target_rows, inv_temperature)
    backends.entry("draft_uncertainty_rows", name)(draft_logits, target_logits, rows, weights, decompose, out)


_draft_uncertainty_rows_op = torch.library.custom_op(
    "epikern::draft_uncertainty_rows", mutates_args=("out",))(_draft_uncertainty_rows)


@_draft_uncertainty_rows_op.register_fake
def _(draft_logits, target_logits, draft_rows, target_rows, weights, inv_temperature, decompose, backend, out):
    return None


@flops.flop_formula("draft_uncertainty_rows")
def _(draft_logits, target_logits, draft_rows, target_rows, weights, inv_temperature, decompose, backend,
      out, out_shape=None) -> int:
    K, _, V = draft_logits
    return draft_uncertainty_flops(K, out[1], V, target_logits is not None, decompose)


def draft_uncertainty_rows(
    draft_logits: Tensor,
    target_logits: Optional[Tensor] = None,
    *,
    draft_rows: Optional[Tensor] = None,
    target_rows: Optional[Tensor] = None,
    temperature: Union[float, Tensor] = 1.0,
    weights: Union[None, Sequence[float], Tensor] = None,
    decompose: bool = True,
    vocab_size: Optional[int] = None,
    out: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> DraftUncertainty:
    """Token-level EU of N output rows read through row maps from an engine's logit buffers.

    Output row ``n`` is ``draft_uncertainty(draft_logits[:, draft_rows[n]],
    target_logits[target_rows[n]], temperature=temperature[n])``.

    Args:
        draft_logits: ``[K, *rows, V]`` logits of K drafts (fp32/fp16/bf16), e.g. vLLM V2's
            ``[K, max_reqs, γ, V]``; ``*rows`` is flattened to ``R_d`` rows (a view when the
            strides allow, as for a contiguous buffer).
        target_logits: ``[*rows, V]`` logits of the reference p (``R_t`` rows after flattening),
            or None for a draft-only ensemble.
        draft_rows: ``[N]`` int32/int64 draft row of each output row (None: row n, then
            ``R_d = N``). Negative entries mark padding rows.
        target_rows: ``[N]`` int32/int64 target row of each output row, e.g. vLLM V1's
            ``target_logits_indices`` (None: row n, then ``R_t = N``). Negative: padding.
        temperature: T > 0 for every row, or a ``[N]`` floating tensor of per-row temperatures
            (on the logits' device). A row whose T is not finite and > 0 is NaN, not an error
            (checking would synchronise): engines mark greedy rows with T ≤ 0 — pass T = 1 there.
        weights, decompose, vocab_size, backend: as in :func:`~epikern.ops.draft_uncertainty`.
        out: optional preallocated float32 ``[7 + K, N]`` buffer (unit stride over N, e.g. a
            column slice ``buf[:, :N]`` of a persistent ``[7 + K, max_N]`` buffer) that must not
            share memory with any input. It is written in full.

    Returns:
        :class:`~epikern.ops.DraftUncertainty` whose fields are views of ``out``: ``[N]`` each,
        ``draft_lse [K, N]``. Padding rows and rows with a bad temperature are NaN in every field.

    Which logits to pass: the *raw* logits of each model (after any logit soft-capping the model
    itself applies, before temperature, top-k, top-p or penalties). EU measures how much the
    drafts' beliefs differ from the target's; a top-k/top-p mask sets logits to −inf, and a
    target token at −inf that some draft still gives mass makes ``kl``/``eu`` +inf, while masks
    that differ per request would make rows incomparable. Pass the sampling temperature as
    ``temperature`` to score the distributions actually sampled from, or 1 for the models' own.

    Raises:
        TypeError: a map that is not an int32/int64 tensor, floating inputs of other dtypes,
            ``out`` that is not float32.
        ValueError: maps of other shapes or lengths, a row count that does not match an absent
            map, tensors on different devices, ``out`` of the wrong shape or strides or sharing
            memory with an input, and (CPU maps) an entry past the last row.
    """
    flops.register_flop_formulas()
    _checks.check_logits("draft_logits", draft_logits, min_dim=2)
    if target_logits is not None:
        _checks.check_logits("target_logits", target_logits, min_dim=1)
    K = draft_logits.shape[0]
    if K == 0:
        raise ValueError(f"draft_logits needs at least one draft (K >= 1), got shape {tuple(draft_logits.shape)}")
    draft_logits, target_logits = _checks.shared_vocab(
        vocab_size, {"draft_logits": draft_logits, "target_logits": target_logits})
    V = draft_logits.shape[-1]
    draft = _checks.last_dim_contiguous(draft_logits.reshape(K, -1, V))
    target = None if target_logits is None else _checks.last_dim_contiguous(target_logits.reshape(-1, V))
    if target is None and target_rows is not None:
        raise ValueError("target_rows was given without target_logits")
    draft_map = _row_map("draft_rows", draft_rows)
    target_map = None if target is None else _row_map("target_rows", target_rows)
    N = _output_rows(draft, target, draft_map, target_map)
    device_weights = weights if isinstance(weights, Tensor) and weights.device.type != "cpu" else None
    temperature_tensor = temperature if isinstance(temperature, Tensor) else None
    device = _checks.check_same_device(draft_logits=draft, target_logits=target, draft_rows=draft_map,
                                       target_rows=target_map, temperature=temperature_tensor,
                                       weights=device_weights, out=out)
    inv_t = _inverse_temperature(temperature, N, device)
    w = _checks.uniform_or_checked_weights(weights, K, device)
    out = _checked_out(out, K, N, device)
    if N > 0:
        if draft.shape[1] == 0 or (target is not None and target.shape[0] == 0):
            raise ValueError(f"the maps give {N} output rows, but draft_logits {tuple(draft_logits.shape)} or "
                             "target_logits has no rows to read")
        op = _draft_uncertainty_rows_op if _checks.through_dispatcher(draft, target, w, inv_t, out) \
            else _draft_uncertainty_rows
        op(draft, target, draft_map, target_map, w, inv_t, bool(decompose), backend or "", out)
    return DraftUncertainty(*out[: len(STATS)].unbind(0), draft_lse=out[len(STATS): len(STATS) + K],
                            target_lse=out[len(STATS) + K])


def _row_map(name: str, index: Optional[Tensor]) -> Optional[Tensor]:
    """A 1-D int32/int64 map, contiguous (a copy only of a strided map: N integers)."""
    if index is None:
        return None
    if not isinstance(index, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32 or int64, got {type(index).__name__}")
    if index.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(index.shape)}")
    return index.contiguous()


def _output_rows(draft: Tensor, target: Optional[Tensor], draft_map: Optional[Tensor],
                 target_map: Optional[Tensor]) -> int:
    """N: the maps' length; an absent map is the identity, so its logits must have N rows."""
    lengths = {name: m.shape[0] for name, m in (("draft_rows", draft_map), ("target_rows", target_map))
               if m is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"the row maps differ in length: {lengths}")
    rows = {"draft_logits": draft.shape[1]} if draft_map is None else {}
    if target is not None and target_map is None:
        rows["target_logits"] = target.shape[0]
    N = next(iter(lengths.values())) if lengths else next(iter(rows.values()))
    for name, count in rows.items():
        if count != N:
            map_name = "draft_rows" if name == "draft_logits" else "target_rows"
            raise ValueError(f"{name} has {count} rows but there are {N} output rows; "
                             f"pass {map_name}= to map output rows to rows of {name}")
    return N


def _inverse_temperature(temperature: Union[float, Tensor], n: int, device: torch.device) -> Tensor:
    """float32 ``[N]`` 1/T; a Python T is checked here, a tensor's values are not (no sync)."""
    if not isinstance(temperature, Tensor):
        return torch.full((n,), 1.0 / _checks.check_temperature(temperature), dtype=torch.float32, device=device)
    if not temperature.dtype.is_floating_point:
        raise TypeError(f"temperature must be a float or a floating tensor, got {temperature.dtype}")
    if temperature.shape != (n,):
        raise ValueError(f"a temperature tensor must have shape [{n}] (one per output row), "
                         f"got {tuple(temperature.shape)}")
    return temperature.to(torch.float32).reciprocal()


def _checked_out(out: Optional[Tensor], k: int, n: int, device: torch.device) -> Tensor:
    shape = (packed_rows(k), n)
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != torch.float32:
        raise TypeError(f"out must be float32, got {out.dtype}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape [7 + K, N] = {list(shape)}, got {tuple(out.shape)}")
    if n > 1 and out.stride(1) != 1:
        raise ValueError(f"out needs unit stride over N (e.g. buf[:, :N]), got strides {out.stride()}")
    return out


def _check_in_range(name: str, index: Optional[Tensor], logits_name: str, rows: int) -> None:
    """Refuse CPU map entries ``≥ rows`` (negative entries are padding)."""
    if index is not None and index.device.type == "cpu" and index.numel():
        top = int(index.max())
        if top >= rows:
            raise ValueError(f"{name} has entry {top}, out of range for the {rows} rows of {logits_name} "
                             "(negative entries mark padding rows)")


def _memory_span(x: Tensor) -> tuple[int, int]:
    """Byte range ``[lo, hi)`` a non-empty tensor can touch."""
    last = sum((size - 1) * abs(stride) for size, stride in zip(x.shape, x.stride()))
    return x.data_ptr(), x.data_ptr() + (last + 1) * x.element_size()


def _check_no_overlap(out: Tensor, **inputs: Optional[Tensor]) -> None:
    """``out`` is written while the inputs are read: they must not share memory."""
    if out.numel() == 0 or out.device.type == "meta":
        return
    lo, hi = _memory_span(out)
    for name, x in inputs.items():
        if x is None or x.numel() == 0 or x.device != out.device:
            continue
        x_lo, x_hi = _memory_span(x)
        if x_lo < hi and lo < x_hi:
            raise ValueError(f"out shares memory with {name}; pass a separate buffer")
