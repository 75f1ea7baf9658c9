"""A DraftEnsemble decode step as one fused CPU call (csrc/cpu/decoder_step.cpp).

A speculative round runs the drafts γ + 1 times on one or a few new tokens. At the sizes drafts
have, such a step is ~25 ATen ops a layer of 1–10 µs dispatch each for microseconds of arithmetic
(the tiny default drafts: 0.45 ms, a third of the 6-layer target's step, for 0.87× its FLOPs; see
benchmarks/RESULTS.md). The fused kernel does the embedding, every stacked layer (RMSNorm, fused
QKV, rotary, the KV cache append, GQA attention under the padding mask, SwiGLU MLP) and the K LM
heads in one call, writing the keys and values straight into the :class:`DraftCache` buffers.

It runs when :func:`fusable` says so — CPU, float32, no autograd, no ``torch.compile`` or dispatch
mode watching (``FlopCounterMode`` counts the PyTorch path's matmuls), a non-empty cache, at most
:data:`MAX_TOKENS` new tokens, SiLU, full attention, a static RoPE, in-major weights — and
:meth:`DraftEnsemble.forward` otherwise takes the PyTorch path, which is also the reference the
tests hold it to (float32 round-off: the sums run in another order). The math is that of
:class:`~epikern.models.layers.StackedDecoderLayer`; a query row with no key to attend to (all
padding, which generation never produces) gets a zero attention output.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops._checks import dispatcher_watching

try:
    from .. import _cpu
except ImportError:  # an install without the compiled module: the PyTorch path only
    _cpu = None

#: Most new tokens a fused step takes (a decode step is 1–2, a verification γ + 1); a prefill runs
#: the PyTorch path, whose matmuls are MKL's.
MAX_TOKENS = 16
_FIELDS = ("qkv", "o", "gate_up", "down")


def _in_major(weight: Tensor) -> bool:
    """``weight [G, out, in]`` laid out as :func:`~epikern.models.layers.in_major` makes it."""
    G, out, inp = weight.shape
    return weight.stride() == (inp * out, 1, out) or (G == 1 and weight.stride()[1:] == (1, out))


def fusable(ens, input_ids: Tensor, cache, past: int) -> bool:
    """Whether :func:`fused_forward` can run this step of ``ens`` (host-side checks only; ``past``
    is the cache's length)."""
    if _cpu is None or cache is None or past == 0 or not ens.fused_decode or input_ids.device.type != "cpu":
        return False
    if dispatcher_watching():  # FlopCounterMode must see the matmuls, torch.compile the ATen graph
        return False
    if input_ids.shape[1] > MAX_TOKENS:
        return False
    if ens._fused_dims is None:  # the layout, checked once (DraftEnsemble._apply resets it)
        ens._fused_dims = _dims(ens) or ()
    if not ens._fused_dims:
        return False
    return not (torch.is_grad_enabled() and any(p.requires_grad for p in ens.parameters()))


def _dims(ens) -> Optional[tuple]:
    """The kernel's size arguments ``(K, H, heads, kv_heads, head_dim, I, V, eps, scale)``, or None
    if ``ens`` is outside what the kernel does."""
    config = ens.config
    rope_type = getattr(ens.rotary_emb, "rope_type", None)
    if (getattr(config, "hidden_act", None) != "silu" or ens.sliding_window is not None
            or not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope"):
        return None
    layer = ens.layers[0]
    if layer.head_dim % 2 or layer.head_dim > 512 or layer.num_heads % layer.num_kv_heads:
        return None
    tensors = [ens.embed_tokens.weight, ens.norm_weight, ens.lm_head_weight] + list(ens.layers.parameters())
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    matrices = [getattr(l, f"{name}_weight") for l in ens.layers for name in _FIELDS] + [ens.lm_head_weight]
    if not (ens.embed_tokens.weight.is_contiguous() and all(_in_major(w) for w in matrices)):
        return None
    return (ens.num_drafts, config.hidden_size, layer.num_heads, layer.num_kv_heads, layer.head_dim,
            config.intermediate_size, config.vocab_size, float(config.rms_norm_eps), float(layer.scaling))


def fused_forward(ens, input_ids: Tensor, attention_mask: Optional[Tensor], cache, position_ids: Tensor,
                  logits_to_keep: int) -> Tensor:
    """:meth:`DraftEnsemble.forward` for a step :func:`fusable` accepted: ``[K, B, T', V]`` float32.

    ``attention_mask [B, past + T]`` or None (no padding), ``position_ids [B, T]``, past = the
    cache's length; the cache grows by T positions (and is cropped back if the kernel raises, e.g.
    on a token id outside the vocabulary or a position beyond the rotary table).
    """
    B, T = input_ids.shape
    past = cache.get_seq_length()
    K, V = ens._fused_dims[0], ens._fused_dims[6]
    keep = T if logits_to_keep <= 0 else min(logits_to_keep, T)
    cos, sin = ens._rotary_table_for(torch.float32, input_ids.device, past + T)
    ids = input_ids.long().contiguous()
    positions = position_ids.long()
    mask = None
    if attention_mask is not None:
        mask = attention_mask.long()
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    out = torch.empty(K, B, keep, V)
    fields = []
    try:
        for layer, kv in zip(ens.layers, cache.layers):
            keys, values = kv.extend(T)
            p = layer._parameters  # direct: nn.Module.__getattr__ would cost more than the kernel's arithmetic
            fields.append(p["input_norm"].shape[0])
            for name in _FIELDS:
                bias = p[f"{name}_bias"]
                fields += (p[f"{name}_weight"].data_ptr(), 0 if bias is None else bias.data_ptr())
            fields += (p["input_norm"].data_ptr(), p["post_norm"].data_ptr(), keys.data_ptr(), values.data_ptr(),
                       keys.shape[-2])
        _cpu.stacked_decode_step(
            ids.data_ptr(), positions.data_ptr(), positions.stride(0), positions.stride(1),
            0 if mask is None else mask.data_ptr(), 0 if mask is None else mask.stride(0), B, T, past,
            ens.embed_tokens.weight.data_ptr(), cos.data_ptr(), sin.data_ptr(), cos.shape[0], fields,
            *ens._fused_dims, ens.norm_weight.data_ptr(), ens.lm_head_weight.data_ptr(), keep, out.data_ptr(),
            torch.get_num_threads(),
        )
    except Exception:
        for kv in cache.layers:  # the layers extended so far go back to ``past``
            if kv.get_seq_length() > past:
                kv.crop(past - kv.get_seq_length())
        raise
    return out


__all__ = ["MAX_TOKENS", "fusable", "fused_forward"]
