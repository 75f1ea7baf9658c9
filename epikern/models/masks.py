"""Positions and attention masks with the semantics of ``transformers`` (5.x) generation.

A 2-D ``attention_mask [B, past + T]`` (1 = token, 0 = padding) covers the cached tokens and the T
new ones, as in HF ``generate``. Positions count real tokens only, so a left-padded row starts at
position 0 at its first real token; a query attends to keys at or before it (and within the sliding
window, if any) that are not padding.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


def position_ids_from_mask(attention_mask: Tensor, query_length: int) -> Tensor:
    """Positions ``[B, T]`` of the last ``query_length`` tokens: ``cumsum(mask) − 1``, padding → 0.

    This is what HF ``generate`` feeds the model for a padded batch (positions of padding tokens do
    not matter: no real token attends to them).
    """
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)[:, -query_length:]


def check_mask_shape(attention_mask: Optional[Tensor], batch_size: int, kv_length: int, query_length: int) -> None:
    """Raise unless ``attention_mask`` is None or ``[batch, past + new tokens]``."""
    if attention_mask is not None and tuple(attention_mask.shape) != (batch_size, kv_length):
        raise ValueError(
            f"attention_mask must be [batch, past + new tokens] = [{batch_size}, {kv_length}] "
            f"(past {kv_length - query_length}, new {query_length}), got {tuple(attention_mask.shape)}"
        )


def causal_mask(
    attention_mask: Optional[Tensor],
    batch_size: int,
    query_length: int,
    past_length: int,
    sliding_window: Optional[int],
    device: torch.device,
) -> tuple[Optional[Tensor], bool]:
    """Boolean attention mask for T new queries after ``past_length`` cached keys.

    Returns ``(mask, is_causal)``: ``mask`` is ``[B, 1, T, past + T]`` (True = attend) or None, and
    ``is_causal`` says that with ``mask=None`` the plain causal mask applies (a prefill without
    padding). Without padding information, a single decode query needs no mask at all. The mask is
    built without reading ``attention_mask`` on the host (no device synchronisation).
    """
    kv_length = past_length + query_length
    if attention_mask is None:
        if sliding_window is None or kv_length <= sliding_window:
            if query_length == 1:
                return None, False
            if past_length == 0:
                return None, True
    check_mask_shape(attention_mask, batch_size, kv_length, query_length)
    q_pos = torch.arange(past_length, kv_length, device=device)[:, None]
    k_pos = torch.arange(kv_length, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    if attention_mask is None:
        return allowed.expand(batch_size, 1, query_length, kv_length), False
    return allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :], False


def nan_where_not(u: NamedTuple, keep: Tensor) -> NamedTuple:
    """Set every field of a NamedTuple of ``[..., B, T]`` tensors (DraftUncertainty,
    EnsembleUncertainty) to NaN where ``keep [B, T]`` is False."""
    return type(u)(*(f.masked_fill(~keep, float("nan")) for f in u))
