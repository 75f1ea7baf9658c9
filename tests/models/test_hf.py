"""The transformers-facing helpers: lm_logits' own verification mask against HF's, the model-type
list, the cache keyword."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from transformers import DynamicCache

from epikern.models.hf import GATED_LLAMA_FAMILY, builds_plain_causal_mask, hf_cache_keyword, lm_logits
from epikern.models.masks import position_ids_from_mask
from .helpers import tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma"])
@pytest.mark.parametrize("padded", [False, True])
def test_verification_mask_gives_hf_logits_bit_for_bit(arch, padded):
    """lm_logits builds the 4-D mask of a T > 1 forward after a cache itself (where HF's is the plain
    causal ∧ padding mask): the logits equal HF's own path exactly; sliding-window Mistral keeps HF's."""
    model = tiny_model(arch, seed=3)
    assert builds_plain_causal_mask(model.config) == (arch != "mistral")
    B, P, T = 2, 9, 3  # mistral's window is 6 < P + T: its mask is not the plain one
    ids = torch.randint(0, model.config.vocab_size, (B, P + T), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(B, P + T, dtype=torch.long)
    if padded:
        mask[0, :4] = 0
    positions = position_ids_from_mask(mask, P + T)
    keyword = hf_cache_keyword(type(model))

    def verify(ours: bool) -> torch.Tensor:
        cache = DynamicCache(config=model.config)
        lm_logits(model, ids[:, :P], mask[:, :P], positions[:, :P], cache, 0)
        if ours:
            return lm_logits(model, ids[:, P:], mask, positions[:, P:], cache, T)
        return model(input_ids=ids[:, P:], attention_mask=mask, position_ids=positions[:, P:], use_cache=True,
                     logits_to_keep=T, **{keyword: cache}).logits

    assert torch.equal(verify(True), verify(False))


def test_plain_mask_needs_sdpa_a_known_type_and_full_attention():
    assert builds_plain_causal_mask(transformers.LlamaConfig(attn_implementation="sdpa"))
    assert not builds_plain_causal_mask(transformers.LlamaConfig(attn_implementation="eager"))
    assert not builds_plain_causal_mask(transformers.Gemma2Config(attn_implementation="sdpa"))  # sliding layers
    assert not builds_plain_causal_mask(transformers.GPT2Config(attn_implementation="sdpa"))
    assert {"llama", "mistral", "qwen2", "qwen3"} <= GATED_LLAMA_FAMILY and "gpt2" not in GATED_LLAMA_FAMILY


def test_cache_keyword_names_a_forward_parameter():
    model_type = type(tiny_model("llama"))
    assert hf_cache_keyword(model_type) in inspect.signature(model_type.forward).parameters
