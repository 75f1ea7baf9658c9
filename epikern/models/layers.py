"""Llama-family decoder layers whose weights are stacked over G groups (drafts) and run as one step.

A :class:`StackedDecoderLayer` holds the weights of G decoder layers of one architecture (Llama,
Mistral, Qwen2: pre-norm RMSNorm, rotary GQA attention, SwiGLU MLP) stacked on a leading group
dimension. Its input is ``[G, B, T, hidden]``: group g runs layer g's weights on its own slice, all
groups in one batched matmul per projection (``torch.baddbmm`` over G; query, key and value fused
into one, gate and up into another) and one attention call with the group folded into the batch.
The DraftEnsemble trunk is a G=1 stack, the branches a G=K stack.

The math mirrors ``transformers`` (5.x) ``LlamaDecoderLayer`` operation for operation (RMSNorm in
float32, rotary on query and key, ``scaled_dot_product_attention`` with the HF boolean mask), so the
outputs match HF models to float32 round-off.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN

from .cache import StackedKVLayer

#: HF decoder-layer parameter names this module understands (``None``-able biases included).
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
#: The stacked projections and the HF projections each one fuses, in output order: one batched matmul
#: computes the query, key and value (``qkv``), one the MLP's gate and up (``gate_up``).
FUSED = {"qkv": LINEARS[:3], "o": LINEARS[3:4], "gate_up": LINEARS[4:6], "down": LINEARS[6:]}


def head_dim_of(config) -> int:
    """Per-head width of an HF config (``head_dim`` if set, else ``hidden_size // heads``)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF ``LlamaRMSNorm`` per group: ``x [G, ..., H]``, ``weight [G, H]``.

    ``weight · (x / sqrt(mean(x²) + eps))``, the statistics in float32 and the normalised x cast back
    to x's dtype before the weight multiplies it, as HF does (``F.rms_norm`` computes in float32).
    """
    return weight.view(weight.shape[0], *([1] * (x.dim() - 2)), -1) * F.rms_norm(x, x.shape[-1:], eps=eps)


def in_major(weight: Tensor) -> Tensor:
    """``weight [..., out, in]`` laid out in memory as a contiguous ``[..., in, out]`` (its transpose
    is contiguous): the layout in which ``torch.bmm`` reads per-group weights fastest for the one or
    two rows a decode step has (with MKL, a SmolLM2 self-draft step 1.36× faster than with
    ``[out, in]``). Same values, same shape; ``.contiguous()`` (as ``save_pretrained`` does) restores the
    usual layout, ``copy_`` into it (``load_state_dict``) keeps this one."""
    return weight.transpose(-1, -2).contiguous().transpose(-1, -2)


def grouped_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Per-group ``nn.Linear``: ``x [G, B, T, in]``, ``weight [G, out, in]``, ``bias [G, out]``.

    ``x`` may broadcast over G (a stride-0 group dimension, e.g. the trunk output fanned out to the
    branches); it is then read once per group by the batched matmul, never copied.
    """
    G, B, T, _ = x.shape
    rows = x.reshape(G, B * T, -1)
    wt = weight.transpose(1, 2)
    y = torch.bmm(rows, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), rows, wt)
    return y.view(G, B, T, -1)


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotary embedding (HF ``apply_rotary_pos_emb``): ``x · cos + rotate_half(x) · sin``.

    ``x [G, B, heads, T, d]``; ``cos``, ``signed_sin`` broadcast to it (``[1, B, 1, T, d]``) with the
    sign of ``rotate_half`` folded into the sine (:func:`rotary_tables`), so that
    ``rotate_half(x) · sin = roll(x, d/2) · signed_sin``.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def rotary_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """HF's ``cos, sin [B, T, d]`` as :func:`rotate` takes them, ``[1, B, 1, T, d]`` each, the first
    half of the sine negated (``rotate_half(x) = (−x₂, x₁)``)."""
    half = sin.shape[-1] // 2
    return cos[None, :, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[None, :, None]


class StackedDecoderLayer(nn.Module):
    """G decoder layers of one HF Llama-family architecture, stacked and advanced in one step.

    Parameters (G = number of groups; q/kv/i = query, key-value and MLP widths), the HF projections
    fused along the output dim as in :data:`FUSED`: ``qkv_weight [G, q + 2·kv, H]`` (rows: query,
    key, value), ``o_weight [G, H, q]``, ``gate_up_weight [G, 2·i, H]`` (rows: gate, up),
    ``down_weight [G, H, i]``, optional matching biases ``*_bias [G, out]`` (Qwen2 has q/k/v biases,
    ``mlp_bias`` configs have MLP biases), and the two RMSNorm weights ``input_norm``/``post_norm
    [G, H]``. The matrices are :func:`in_major`; :meth:`projection` gives one HF projection's slice. A state dict saved before the
    fusion (``q_weight``, ``k_weight``, ..., ``gate_weight``, ``up_weight``) loads too.
    """

    def __init__(self, config, groups: int, biases: frozenset, *, dtype=None, device=None):
        super().__init__()
        H, d = config.hidden_size, head_dim_of(config)
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.eps = config.rms_norm_eps
        self.act = ACT2FN[config.hidden_act]
        self.scaling = d ** -0.5
        q, kv, i = self.num_heads * d, self.num_kv_heads * d, config.intermediate_size
        self.widths = {"self_attn.q_proj": (q, H), "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H),
                       "self_attn.o_proj": (H, q), "mlp.gate_proj": (i, H), "mlp.up_proj": (i, H),
                       "mlp.down_proj": (H, i)}
        std = getattr(config, "initializer_range", 0.02)
        for name, members in FUSED.items():
            with_bias = {m in biases for m in members}
            if len(with_bias) != 1:
                raise ValueError(f"{', '.join(members)} are fused into one matmul: either all or none of them "
                                 f"may have a bias, got biases on {sorted(set(members) & set(biases))}")
            out, inp = sum(self.widths[m][0] for m in members), self.widths[members[0]][1]
            self.register_parameter(f"{name}_weight", nn.Parameter(
                in_major(torch.empty(groups, out, inp, dtype=dtype, device=device).normal_(0.0, std))))
            bias = nn.Parameter(torch.zeros(groups, out, dtype=dtype, device=device)) if with_bias.pop() else None
            self.register_parameter(f"{name}_bias", bias)
        self.input_norm = nn.Parameter(torch.ones(groups, H, dtype=dtype, device=device))
        self.post_norm = nn.Parameter(torch.ones(groups, H, dtype=dtype, device=device))

    @staticmethod
    def norm_name(hf_name: str) -> str:
        """``"input_layernorm"`` → ``"input_norm"``, ``"post_attention_layernorm"`` → ``"post_norm"``."""
        return {"input_layernorm": "input_norm", "post_attention_layernorm": "post_norm"}[hf_name]

    def projection(self, hf_name: str) -> tuple[Tensor, Optional[Tensor]]:
        """HF projection ``hf_name``'s ``(weight [G, out, in], bias [G, out] or None)``: views into the
        fused parameters (writing them writes the layer)."""
        for name, members in FUSED.items():
            if hf_name in members:
                start = sum(self.widths[m][0] for m in members[: members.index(hf_name)])
                rows = slice(start, start + self.widths[hf_name][0])
                bias = getattr(self, f"{name}_bias")
                return getattr(self, f"{name}_weight")[:, rows], None if bias is None else bias[:, rows]
        raise KeyError(f"{hf_name!r} is not one of {LINEARS}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, members in FUSED.items():  # a state dict saved before the fusion
            for kind in ("weight", "bias"):
                old = [f"{prefix}{m.split('.')[-1].removesuffix('_proj')}_{kind}" for m in members]
                if len(members) > 1 and all(key in state_dict for key in old):
                    state_dict[f"{prefix}{name}_{kind}"] = torch.cat([state_dict.pop(key) for key in old], dim=1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def groups(self) -> int:
        return self.input_norm.shape[0]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor], is_causal: bool,
                kv: Optional[StackedKVLayer]) -> Tensor:
        """One decoder step for every group.

        Args:
            x: ``[G, B, T, H]`` hidden states (may be a stride-0 broadcast over G).
            cos, sin: rotary tables for the T new positions, as :func:`rotary_tables` makes them.
            mask: boolean ``[G·B, 1, T, past + T]`` (True = attend; group-major, the batch mask
                repeated G times) or None.
            is_causal: with ``mask=None``, apply the plain causal mask (prefill without padding).
            kv: this layer's cache (keys/values ``[G, B, kv_heads, past, head_dim]``), or None.

        Returns:
            ``[G, B, T, H]``.
        """
        G, B, T, _ = x.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        h = rms_norm(x, self.input_norm, self.eps)
        qkv = grouped_linear(h, self.qkv_weight, self.qkv_bias).view(G, B, T, heads + 2 * kv_heads, -1).transpose(2, 3)
        qk = rotate(qkv[:, :, : heads + kv_heads], cos, sin)  # query and key heads rotated in one go
        q, k, v = qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, heads + kv_heads:]
        if kv is not None:
            k, v = kv.update(k, v)
        attn = F.scaled_dot_product_attention(
            q.reshape(G * B, heads, T, -1),
            k.reshape(G * B, kv_heads, k.shape[-2], -1),
            v.reshape(G * B, kv_heads, v.shape[-2], -1),
            attn_mask=mask,
            is_causal=is_causal and mask is None,
            scale=self.scaling,
            enable_gqa=heads != kv_heads,
        )
        attn = attn.view(G, B, heads, T, -1).transpose(2, 3).reshape(G, B, T, -1)
        x = x + grouped_linear(attn, self.o_weight, self.o_bias)
        h = rms_norm(x, self.post_norm, self.eps)
        gate, up = grouped_linear(h, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        return x + grouped_linear(self.act(gate) * up, self.down_weight, self.down_bias)
