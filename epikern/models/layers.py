"""Llama-family decoder layers whose weights are stacked over G groups (drafts) and run as one step.

A :class:`StackedDecoderLayer` holds the weights of G decoder layers of one architecture (Llama,
Mistral, Qwen2: pre-norm RMSNorm, rotary GQA attention, SwiGLU MLP) stacked on a leading group
dimension. Its input is ``[G, B, T, hidden]``: group g runs layer g's weights on its own slice, all
groups in one batched matmul per projection (``torch.baddbmm`` over G) and one attention call with
the group folded into the batch. The DraftEnsemble trunk is a G=1 stack, the branches a G=K stack.

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


def head_dim_of(config) -> int:
    """Per-head width of an HF config (``head_dim`` if set, else ``hidden_size // heads``)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF ``LlamaRMSNorm`` per group: ``x [G, ..., H]``, ``weight [G, H]`` (statistics in float32)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.view(weight.shape[0], *([1] * (x.dim() - 2)), -1) * h.to(dtype)


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


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding (HF ``apply_rotary_pos_emb``): ``x [G, B, heads, T, d]``, ``cos/sin [B, T, d]``."""
    cos, sin = cos[None, :, None], sin[None, :, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class StackedDecoderLayer(nn.Module):
    """G decoder layers of one HF Llama-family architecture, stacked and advanced in one step.

    Parameters (G = number of groups; q/kv/i = query, key-value and MLP widths):
    ``q_weight [G, q, H]``, ``k_weight``/``v_weight [G, kv, H]``, ``o_weight [G, H, q]``,
    ``gate_weight``/``up_weight [G, i, H]``, ``down_weight [G, H, i]``, optional matching biases
    ``*_bias [G, out]`` (Qwen2 has q/k/v biases, ``mlp_bias`` configs have MLP biases), and the two
    RMSNorm weights ``input_norm``/``post_norm [G, H]``.
    """

    def __init__(self, config, groups: int, biases: frozenset, *, dtype=None, device=None):
        super().__init__()
        H, d = config.hidden_size, head_dim_of(config)
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.eps = config.rms_norm_eps
        self.act = ACT2FN[config.hidden_act]
        self.scaling = d ** -0.5
        q, kv, i = self.num_heads * d, self.num_kv_heads * d, config.intermediate_size
        shapes = {"self_attn.q_proj": (q, H), "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H),
                  "self_attn.o_proj": (H, q), "mlp.gate_proj": (i, H), "mlp.up_proj": (i, H),
                  "mlp.down_proj": (H, i)}
        std = getattr(config, "initializer_range", 0.02)
        for hf_name, (out, inp) in shapes.items():
            name = self.param_name(hf_name)
            self.register_parameter(f"{name}_weight", nn.Parameter(
                torch.empty(groups, out, inp, dtype=dtype, device=device).normal_(0.0, std)))
            bias = None
            if hf_name in biases:
                bias = nn.Parameter(torch.zeros(groups, out, dtype=dtype, device=device))
            self.register_parameter(f"{name}_bias", bias)
        self.input_norm = nn.Parameter(torch.ones(groups, H, dtype=dtype, device=device))
        self.post_norm = nn.Parameter(torch.ones(groups, H, dtype=dtype, device=device))

    @staticmethod
    def param_name(hf_name: str) -> str:
        """``"self_attn.q_proj"`` → ``"q"``, ``"mlp.gate_proj"`` → ``"gate"``; norms map to themselves."""
        return {"input_layernorm": "input_norm", "post_attention_layernorm": "post_norm"}.get(
            hf_name, hf_name.split(".")[-1].removesuffix("_proj"))

    @property
    def groups(self) -> int:
        return self.input_norm.shape[0]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor], is_causal: bool,
                kv: Optional[StackedKVLayer]) -> Tensor:
        """One decoder step for every group.

        Args:
            x: ``[G, B, T, H]`` hidden states (may be a stride-0 broadcast over G).
            cos, sin: ``[B, T, head_dim]`` rotary tables for the T new positions.
            mask: boolean ``[G·B, 1, T, past + T]`` (True = attend; group-major, the batch mask
                repeated G times) or None.
            is_causal: with ``mask=None``, apply the plain causal mask (prefill without padding).
            kv: this layer's cache (keys/values ``[G, B, kv_heads, past, head_dim]``), or None.

        Returns:
            ``[G, B, T, H]``.
        """
        G, B, T, _ = x.shape
        h = rms_norm(x, self.input_norm, self.eps)
        q = grouped_linear(h, self.q_weight, self.q_bias).view(G, B, T, self.num_heads, -1).transpose(2, 3)
        k = grouped_linear(h, self.k_weight, self.k_bias).view(G, B, T, self.num_kv_heads, -1).transpose(2, 3)
        v = grouped_linear(h, self.v_weight, self.v_bias).view(G, B, T, self.num_kv_heads, -1).transpose(2, 3)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if kv is not None:
            k, v = kv.update(k, v)
        attn = F.scaled_dot_product_attention(
            q.reshape(G * B, self.num_heads, T, -1),
            k.reshape(G * B, self.num_kv_heads, k.shape[-2], -1),
            v.reshape(G * B, self.num_kv_heads, v.shape[-2], -1),
            attn_mask=mask,
            is_causal=is_causal and mask is None,
            scale=self.scaling,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        attn = attn.view(G, B, self.num_heads, T, -1).transpose(2, 3).reshape(G, B, T, -1)
        x = x + grouped_linear(attn, self.o_weight, self.o_bias)
        h = rms_norm(x, self.post_norm, self.eps)
        mlp = self.act(grouped_linear(h, self.gate_weight, self.gate_bias)) * grouped_linear(h, self.up_weight, self.up_bias)
        return x + grouped_linear(mlp, self.down_weight, self.down_bias)
