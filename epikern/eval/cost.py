"""Inference cost: analytic and measured FLOPs, and peak memory (design §6); latency is timed by
:mod:`epikern.eval.timing`.

FLOP convention (everywhere in epikern): **one multiply-add = 2 FLOPs**, the convention of
``torch.utils.flop_counter`` (``aten.mm`` of ``[n, k] @ [k, m]`` counts ``2·n·k·m``).

Analytic forward FLOPs of a decoder-only LM for **one token** that attends to ``c`` keys::

    F(c) = 2 · P_matmul  +  Σ_l 4 · c_l · d_attn

* ``P_matmul`` — entries of every weight matrix a token is multiplied with: per layer the q, k, v,
  o projections (GQA: k and v have ``num_key_value_heads · head_dim`` rows) and the MLP matrices,
  plus the LM head ``V · H``. The LM head counts even when it is tied to the input embedding (the
  matrix is stored once but used as a matmul); the input embedding is a gather and costs nothing.
  Norm weights, biases, rotary tables, activations and the softmax are elementwise (O(H) per token)
  and not counted, as ``FlopCounterMode`` does not count them.
* attention — per layer ``2·c·d_attn`` for the scores ``q·kᵀ`` and ``2·c·d_attn`` for the weighted
  sum of values, ``d_attn = num_attention_heads · head_dim`` (GQA does not reduce it: every query
  head scores every key). ``c_l = min(c, sliding_window)`` on sliding-window layers.

Relations to what ``FlopCounterMode`` measures (tested in ``tests/eval/test_cost.py``):

* a decode step (one new token, ``c − 1`` cached) counts exactly ``F(c)``;
* a prefill of ``T`` tokens counts exactly ``T · F(T)``: attention kernels compute (and the counter
  counts) the full ``T × T`` score matrix, masked or not. The causal work actually needed is
  ``Σ_{c=1..T} F(c) = T · F((T + 1) / 2)`` (F is affine in c without a sliding window);
  ``context_len`` may be fractional for such means, e.g.
  :func:`mean_decode_context` for the tokens generated after a prompt.

``count_flops`` registers formulas before it starts counting for what the stock counter cannot
see: the epikern custom ops (``epikern::draft_uncertainty`` — see
:func:`epikern.ops.draft_uncertainty.draft_uncertainty_flops` — and the fused-linear forward-KL
ops) and PyTorch's CPU flash attention (``aten._scaled_dot_product_flash_attention_for_cpu``,
which ``torch.utils.flop_counter`` lists only for CUDA kernels), so attention is counted on CPU too.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from torch import nn

from ..models.hf import GATED_LLAMA_FAMILY
from ..models.layers import FUSED, head_dim_of
from ..ops.draft_uncertainty import draft_uncertainty_flops
from .timing import resolve_device

__all__ = ["lm_flops_per_token", "draft_ensemble_flops_per_token", "mean_decode_context",
           "draft_uncertainty_flops", "count_flops", "register_flop_formulas", "PeakMemory",
           "peak_memory"]

# --------------------------------------------------------------------------------------------
# analytic FLOPs


def mean_decode_context(prompt_len: int, new_tokens: int) -> float:
    """Mean number of keys a generated token attends to: tokens ``prompt_len + 1 .. prompt_len +
    new_tokens`` see ``prompt_len + i`` keys, mean ``prompt_len + (new_tokens + 1) / 2``."""
    if prompt_len < 0 or new_tokens < 1:
        raise ValueError(f"need prompt_len >= 0 and new_tokens >= 1, got {prompt_len}, {new_tokens}")
    return prompt_len + (new_tokens + 1) / 2


def _check_context(context_len: float) -> float:
    if isinstance(context_len, bool) or not isinstance(context_len, (int, float)) or not context_len >= 1:
        raise ValueError(f"context_len must be a number >= 1 (keys the token attends to, itself "
                         f"included), got {context_len!r}")
    return float(context_len)


def _layer_windows(config) -> list[Optional[int]]:
    """Per layer, the sliding attention window, or None for full attention."""
    L = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types]
    # configs without layer_types (Mistral) apply a set sliding_window to every layer
    return [window] * L


def _attention_flops(config, context_len: float, groups_per_layer: list[int]) -> float:
    """``Σ_l groups_l · 4 · min(c, window_l) · d_attn`` for one token."""
    d_attn = config.num_attention_heads * head_dim_of(config)
    windows = _layer_windows(config)
    if len(windows) != len(groups_per_layer):
        raise ValueError(f"config has {len(windows)} layer types for {len(groups_per_layer)} layers")
    return sum(g * 4 * (context_len if w is None else min(context_len, w)) * d_attn
               for g, w in zip(groups_per_layer, windows))


def _config_matmul_params(config) -> int:
    """Weight-matrix entries of a Llama-family layout, from the config alone."""
    missing = [f for f in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if getattr(config, f, None) is None]
    if missing:
        raise ValueError(f"config {type(config).__name__} lacks {missing}; pass the model instead")
    H, L, V, inter = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    d = head_dim_of(config)
    q = config.num_attention_heads * d
    kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * d
    per_layer = H * q + 2 * H * kv + q * H + 3 * H * inter
    return L * per_layer + V * H


def _module_matmul_params(model: nn.Module) -> int:
    """Weight entries of every ``nn.Linear`` (and HF ``Conv1D``, GPT-2's linear) in ``model``;
    a tied LM head is its own module, so it counts once although its weight is the embedding's."""
    from transformers.pytorch_utils import Conv1D

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)))


def lm_flops_per_token(config_or_model, context_len: float) -> float:
    """Analytic forward FLOPs of one token of a decoder-only LM attending to ``context_len`` keys.

    ``2 · P_matmul + Σ_l 4 · min(context_len, window_l) · num_attention_heads · head_dim`` (module
    docstring). With an HF model the matrix entries are counted from its ``nn.Linear`` modules (any
    architecture); with a config alone the layout must be Llama-family (:data:`GATED_LLAMA_FAMILY`).

    Args:
        config_or_model: an HF ``PretrainedConfig`` or an HF causal LM (``nn.Module`` with ``.config``).
        context_len: keys the token attends to, itself included (``past + 1``); may be fractional
            (a mean over positions, e.g. :func:`mean_decode_context`).
    """
    from ..models.draft_ensemble import DraftEnsemble

    context_len = _check_context(context_len)
    if isinstance(config_or_model, DraftEnsemble):
        raise TypeError("lm_flops_per_token got a DraftEnsemble; use draft_ensemble_flops_per_token")
    if isinstance(config_or_model, nn.Module):
        config = getattr(config_or_model, "config", None)
        if config is None:
            raise TypeError(f"{type(config_or_model).__name__} has no HF .config")
        params = _module_matmul_params(config_or_model)
    else:
        config = config_or_model
        if getattr(config, "model_type", None) not in GATED_LLAMA_FAMILY:
            raise ValueError(
                f"cannot count a {getattr(config, 'model_type', type(config).__name__)!r} config "
                f"without its weights (known layouts: {sorted(GATED_LLAMA_FAMILY)}); pass the model")
        params = _config_matmul_params(config)
    return 2 * params + _attention_flops(config, context_len, [1] * config.num_hidden_layers)


def draft_ensemble_flops_per_token(ensemble, context_len: float) -> float:
    """Analytic forward FLOPs of one token through all K drafts of a ``DraftEnsemble``.

    The trunk (S shared layers) runs once, the ``L − S`` branch layers and the LM head K times::

        2 · (P_trunk + K · P_branch + K · V · H) + 4 · (S + K · (L − S)) · c · d_attn

    (windows as in :func:`lm_flops_per_token`), counted from the stacked weights themselves. It does
    not include the uncertainty op (:func:`draft_uncertainty_flops`).
    """
    from ..models.draft_ensemble import DraftEnsemble

    if not isinstance(ensemble, DraftEnsemble):
        raise TypeError(f"expected an epikern DraftEnsemble, got {type(ensemble).__name__}")
    context_len = _check_context(context_len)
    params = sum(getattr(layer, f"{name}_weight").numel() for layer in ensemble.layers for name in FUSED)
    params += ensemble.lm_head_weight.numel()
    groups = [layer.groups for layer in ensemble.layers]
    return 2 * params + _attention_flops(ensemble.config, context_len, groups)


# --------------------------------------------------------------------------------------------
# measured FLOPs


def _register_cpu_flash_attention() -> None:
    from torch.utils import flop_counter
    from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu not in flop_counter.flop_registry:
        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
        def _(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query, key, value)

    if aten._scaled_dot_product_flash_attention_for_cpu_backward not in flop_counter.flop_registry:
        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
        def _(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out, query, key, value)


def register_flop_formulas() -> None:
    """Register the FLOP formulas of the epikern ops and of CPU flash attention (idempotent).

    A ``FlopCounterMode`` copies the formula registry when it is constructed, so this must run
    before the counter is made; :func:`count_flops` does it for you.
    """
    import torch.utils.flop_counter  # noqa: F401  (the ops register only once it is imported)

    from ..ops.flops import register_flop_formulas as register_op_flop_formulas

    register_op_flop_formulas()
    _register_cpu_flash_attention()


def count_flops(fn: Callable, *args, **kwargs) -> tuple[Any, int, dict[str, int]]:
    """Run ``fn(*args, **kwargs)`` under ``torch.utils.flop_counter.FlopCounterMode``.

    Returns ``(result, total_flops, per_op)`` with ``per_op`` keyed by op name (``"aten.mm"``,
    ``"epikern.draft_uncertainty"``, ...). Matmuls and attention count 2 FLOPs per multiply-add;
    other aten elementwise ops count 0 (the counter's convention); ``epikern::draft_uncertainty``
    counts its scalar arithmetic per vocabulary entry (:func:`draft_uncertainty_flops`).
    """
    from torch.utils.flop_counter import FlopCounterMode

    register_flop_formulas()
    with FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return result, int(counter.get_total_flops()), per_op


# --------------------------------------------------------------------------------------------
# memory (latency: epikern.eval.timing)


class PeakMemory(NamedTuple):
    """Peak memory of a call above what was in use when it started."""

    bytes: int  #: peak extra bytes
    method: str  #: what was measured (see :func:`peak_memory`)


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # "VmHWM:   12345 kB"
    raise OSError(f"/proc/self/status has no {key}")


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ≥ 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: Union[None, str, torch.device] = None) -> tuple[Any, PeakMemory]:
    """Run ``fn()`` once and measure its peak memory above the level at its start.

    * CUDA: ``torch.cuda.max_memory_allocated − memory_allocated`` before the call (peak stats
      reset first): bytes of live tensors from PyTorch's caching allocator on that device
      (``method="cuda_max_memory_allocated"``).
    * CPU on Linux: the process's peak resident set size (``VmHWM`` in ``/proc/self/status``, reset
      to the current RSS through ``/proc/self/clear_refs`` before the call) minus the RSS at the
      start (``method="rss_high_water_mark"``). It sees every allocation that touches memory,
      torch's and any other thread's; memory the allocator already held (freed earlier, still
      resident) is reused without showing up, and ``torch.empty`` pages count once written.
      ``tracemalloc`` would not see torch's C++ allocations at all.
    * Elsewhere: the growth of ``getrusage`` ``ru_maxrss`` (``method="ru_maxrss_delta_lower_bound"``),
      which is 0 unless the call pushes the process above its lifetime peak: a lower bound only.
    """
    device = resolve_device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            result = fn()
            torch.cuda.synchronize()
            return result, PeakMemory(torch.cuda.max_memory_allocated() - base, "cuda_max_memory_allocated")
    if sys.platform.startswith("linux") and _reset_rss_peak():
        base = _proc_status_bytes("VmRSS")
        result = fn()
        return result, PeakMemory(max(_proc_status_bytes("VmHWM") - base, 0), "rss_high_water_mark")
    import resource  # Unix only

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result, PeakMemory((after - before) * scale, "ru_maxrss_delta_lower_bound")
