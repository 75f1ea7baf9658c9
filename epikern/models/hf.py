"""The transformers-facing helpers: one HF causal-LM forward as generation runs it, and what epikern
knows about HF model types and their ``forward`` signature."""

from __future__ import annotations

import functools
import inspect
from typing import Optional

from torch import Tensor, nn
from transformers import DynamicCache

from .masks import causal_mask

#: HF ``model_type`` values of the Llama family: decoder layers of q/k/v/o attention with GQA and a gated
#: MLP (gate/up/down), each given ``create_causal_mask``'s mask unless the config makes it a sliding
#: window. :func:`builds_plain_causal_mask` and :func:`epikern.eval.cost.lm_flops_per_token` rely on it.
GATED_LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"})


def lm_logits(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor], position_ids: Tensor,
              cache: Optional[DynamicCache], logits_to_keep: int) -> Tensor:
    """``[B, T', V]`` logits of an HF causal LM, with generate's explicit ``position_ids``.

    A forward of T > 1 tokens after a non-empty cache (a speculative verification) gets its boolean
    ``[B, 1, T, past + T]`` mask built here (:func:`~epikern.models.masks.causal_mask`) where HF's
    own would be the same plain causal-and-padding mask (:func:`builds_plain_causal_mask`): HF uses a
    4-D mask as given and skips ``create_causal_mask``, which is 0.14 ms of a 1.97 ms 3-token
    verification of the tiny target; the logits are bit-identical (tested).
    """
    T = input_ids.shape[1]
    if T > 1 and cache is not None and attention_mask is not None and attention_mask.dim() == 2 \
            and builds_plain_causal_mask(model.config):
        past = cache.get_seq_length()
        if past:
            attention_mask = causal_mask(attention_mask, input_ids.shape[0], T, past, None, input_ids.device)[0]
    kwargs = {hf_cache_keyword(type(model)): cache, "use_cache": cache is not None}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=logits_to_keep, **kwargs)
    return out.logits


def builds_plain_causal_mask(config) -> bool:
    """Whether HF gives every layer of this model the plain causal ∧ padding boolean mask: SDPA
    attention, a :data:`GATED_LLAMA_FAMILY` type, and no sliding-window layer (``layer_types``, else
    ``sliding_window``)."""
    if getattr(config, "_attn_implementation", None) != "sdpa" \
            or getattr(config, "model_type", None) not in GATED_LLAMA_FAMILY:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None


@functools.lru_cache(maxsize=None)
def hf_cache_keyword(model_type: type) -> str:
    """The cache argument of ``model_type.forward``: ``cache`` in recent transformers 5.x releases,
    ``past_key_values`` in earlier ones."""
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


__all__ = ["GATED_LLAMA_FAMILY", "builds_plain_causal_mask", "hf_cache_keyword", "lm_logits"]
