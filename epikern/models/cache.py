"""The DraftEnsemble KV cache: trunk KV stored once, branch KV once per draft (design §4).

:class:`DraftCache` is a ``transformers`` (5.x) :class:`~transformers.Cache` with one layer per
decoder layer of the drafts. Each layer is a :class:`StackedKVLayer` whose keys and values are
``[G, B, kv_heads, seq, head_dim]``: ``G = 1`` for the S shared trunk layers, ``G = K`` for the
L − S branch layers, so the cache holds exactly ``S + K·(L − S)`` layers of KV. Everything the HF
``Cache`` API offers acts on all drafts together: ``get_seq_length``, ``crop(-n)`` (speculative
rollback), ``batch_select_indices``, ``reorder_cache``, ``batch_repeat_interleave``, ``reset``,
``get_mask_sizes``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer


class StackedKVLayer(DynamicLayer):
    """A growing KV layer for G groups: keys/values ``[G, B, kv_heads, seq, head_dim]``.

    ``keys``/``values`` are the live prefix of buffers with room to grow (capacity ×1.5 when full,
    at least :attr:`headroom` tokens more), so a decode step writes its new tokens in place instead
    of copying the whole cache (``DynamicLayer`` concatenates), and ``crop`` (speculative rollback)
    is a view. A tensor an earlier ``update`` returned is therefore only valid until the next
    ``update`` after a ``crop``. ``crop``, ``get_seq_length`` and ``get_mask_sizes`` are inherited
    from :class:`~transformers.cache_utils.DynamicLayer` (dim −2); the batch operations act on dim
    1, the batch dim behind the group dim (they replace the buffers). With inputs that require grad
    it concatenates, as ``DynamicLayer`` does, so that autograd never sees a buffer written in place.
    """

    headroom = 64

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.requires_grad or value_states.requires_grad:
            return super().update(key_states, value_states)
        n, new = self.get_seq_length(), key_states.shape[-2]
        if not self._writable(key_states, n + new):
            self._grow(key_states, value_states, n + new)
        self._key_buffer[..., n:n + new, :].copy_(key_states)
        self._value_buffer[..., n:n + new, :].copy_(value_states)
        self.keys, self.values = self._key_buffer[..., :n + new, :], self._value_buffer[..., :n + new, :]
        return self.keys, self.values

    def extend(self, new: int) -> tuple[Tensor, Tensor]:
        """Grow the live keys/values of a non-empty layer by ``new`` positions, left for the caller to
        write (the fused decode step, :mod:`epikern.models.fused_step`), and return the buffers
        ``[G, B, kv_heads, capacity, head_dim]`` behind them (contiguous)."""
        n = self.get_seq_length()
        if n == 0:
            raise ValueError("extend needs a layer that already holds keys and values")
        if not self._writable(self.keys, n + new):
            self._grow(self.keys, self.values, n + new)
        self.keys, self.values = self._key_buffer[..., :n + new, :], self._value_buffer[..., :n + new, :]
        return self._key_buffer, self._value_buffer

    def _writable(self, key_states: Tensor, length: int) -> bool:
        """Whether ``keys``/``values`` are still the prefix of the buffers and ``length`` tokens fit."""
        buffer = getattr(self, "_key_buffer", None)
        return (buffer is not None and buffer.shape[-2] >= length and self.keys.numel() > 0
                and self.keys.data_ptr() == buffer.data_ptr() and self.values.data_ptr() == self._value_buffer.data_ptr()
                and self.keys.shape[:-2] == key_states.shape[:-2] == buffer.shape[:-2]
                and self.keys.dtype == key_states.dtype)

    def _grow(self, key_states: Tensor, value_states: Tensor, length: int) -> None:
        """New buffers for at least ``length`` tokens holding the live keys/values."""
        n = self.get_seq_length()
        capacity = max(length + self.headroom, (3 * length) // 2)
        for name, states in (("key", key_states), ("value", value_states)):
            shape = (*states.shape[:-2], capacity, states.shape[-1])
            buffer = states.new_empty(shape)
            if n:
                buffer[..., :n, :].copy_(self.keys if name == "key" else self.values)
            setattr(self, f"_{name}_buffer", buffer)

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            self.keys = self.keys.index_select(1, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(1, beam_idx.to(self.values.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self.keys = self.keys.repeat_interleave(repeats, dim=1)
            self.values = self.values.repeat_interleave(repeats, dim=1)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.get_seq_length() > 0:
            self.keys = self.keys[:, indices]
            self.values = self.values[:, indices]

    @property
    def nbytes(self) -> int:
        """Bytes of the live keys and values (0 before the first update); the buffers behind them
        hold up to ×1.5 + :attr:`headroom` tokens more."""
        if not self.is_initialized:
            return 0
        return self.keys.nbytes + self.values.nbytes


class DraftCache(Cache):
    """KV cache of a :class:`~epikern.models.DraftEnsemble` (one object for all K drafts).

    Args:
        num_layers: L, decoder layers per draft.
        num_drafts: K.
        shared_layers: S, trunk layers (stored once); layers ``S..L-1`` are stored per draft.
        batch_size: B, the batch this cache serves (checked by the ensemble on every call).
    """

    def __init__(self, num_layers: int, num_drafts: int, shared_layers: int, batch_size: int):
        if not 0 <= shared_layers <= num_layers:
            raise ValueError(f"shared_layers must be in [0, {num_layers}], got {shared_layers}")
        if num_drafts < 1 or batch_size < 1:
            raise ValueError(f"num_drafts and batch_size must be >= 1, got {num_drafts} and {batch_size}")
        super().__init__(layers=[StackedKVLayer() for _ in range(num_layers)])
        self.num_drafts, self.shared_layers = num_drafts, shared_layers
        self._batch_size = batch_size

    def layer_groups(self, layer_idx: int) -> int:
        """G of layer ``layer_idx``: 1 for a trunk layer, K for a branch layer."""
        return 1 if layer_idx < self.shared_layers else self.num_drafts

    @property
    def batch_size(self) -> int:
        """B: the batch dim of the cached tensors, or the batch the cache was made for while empty."""
        if self.layers and self.layers[0].get_seq_length() > 0:
            return self.layers[0].keys.shape[1]
        return self._batch_size

    @property
    def nbytes(self) -> int:
        """Bytes of all cached keys and values: ``(S + K·(L−S)) · 2 · B · kv_heads · seq · head_dim · itemsize``
        (the live cache; see :attr:`StackedKVLayer.nbytes` for the buffers' headroom)."""
        return sum(layer.nbytes for layer in self.layers)

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep only the batch rows ``indices`` (all drafts, all layers)."""
        super().batch_select_indices(indices)
        self._batch_size = torch.arange(self._batch_size)[torch.as_tensor(indices, device="cpu")].numel()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (all drafts, all layers)."""
        super().batch_repeat_interleave(repeats)
        self._batch_size *= repeats

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch rows (beam search); the batch size becomes ``len(beam_idx)``."""
        super().reorder_cache(beam_idx)
        self._batch_size = int(beam_idx.numel())
