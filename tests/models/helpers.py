"""Tiny random HF drafts (CPU, fp32) and a reference that runs them one by one with DynamicCache."""

from __future__ import annotations

import copy

import torch
import transformers
from transformers import DynamicCache

from epikern.models.estimator import hf_cache_keyword
from epikern.models.masks import position_ids_from_mask

CONFIGS = {
    "llama": lambda **kw: transformers.LlamaConfig(**{
        "vocab_size": 160, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, **kw}),
    "qwen2": lambda **kw: transformers.Qwen2Config(**{
        "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 1, "max_position_embeddings": 256, **kw}),
    "mistral": lambda **kw: transformers.MistralConfig(**{
        "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "sliding_window": 6, **kw}),
}


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A random fp32 HF causal LM of the tiny ``arch`` config, in eval mode."""
    torch.manual_seed(seed)
    config = CONFIGS[arch](**overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def drafts_sharing_trunk(base, num_drafts: int, shared_layers: int, seed: int = 1):
    """K deep copies of ``base`` whose layers >= S, final norm and LM head are re-randomised."""
    gen = torch.Generator().manual_seed(seed)
    models = []
    for _ in range(num_drafts):
        m = copy.deepcopy(base)
        with torch.no_grad():
            branch = [m.get_decoder().layers[l] for l in range(shared_layers, m.config.num_hidden_layers)]
            for module in branch + [m.get_decoder().norm, m.get_output_embeddings()]:
                for p in module.parameters():
                    p.copy_(p + 0.05 * torch.randn(p.shape, generator=gen))
        models.append(m)
    return models


def hf_forward(model, input_ids, attention_mask, cache):
    """One HF forward with generate's position_ids; returns logits ``[B, T, V]``."""
    T = input_ids.shape[1]
    if attention_mask is None:
        past = 0 if cache is None else cache.get_seq_length()
        position_ids = torch.arange(past, past + T).expand(input_ids.shape[0], T)
    else:
        position_ids = position_ids_from_mask(attention_mask, T)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=cache is not None, **{hf_cache_keyword(type(model)): cache})
    return out.logits


def hf_caches(models):
    return [DynamicCache(config=m.config) for m in models]

