"""Tiny random HF drafts (CPU, fp32), a reference that runs them one by one with DynamicCache, and a
small-vocabulary case whose exact sampling law a goodness-of-fit test can check."""

from __future__ import annotations

import copy
import itertools
from typing import NamedTuple

import numpy as np
import pytest
import torch
import transformers
from scipy import stats
from transformers import DynamicCache

from epikern.models import DraftEnsemble

from epikern.models.hf import hf_cache_keyword
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
    "gemma": lambda **kw: transformers.GemmaConfig(**{
        "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 256, **kw}),
}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are dispatch-bound: extra threads only add contention on a shared machine (use
    with ``pytestmark = pytest.mark.usefixtures("one_thread")`` after importing it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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



V_SMALL, TEMPERATURE, PROMPT = 8, 0.8, [[1, 5, 2]]


class SmallVocab(NamedTuple):
    target: torch.nn.Module
    drafts: DraftEnsemble
    prompt: torch.Tensor  #: [1, 3]
    p: np.ndarray  #: [V³] the target's joint law of three tokens sampled at TEMPERATURE
    q: np.ndarray  #: [V³] the same under the drafts' mixture (a wrong law a test must reject)


@torch.no_grad()
def small_vocab_laws(weights: torch.Tensor) -> SmallVocab:
    """Target and K = 2 drafts over 8 tokens, peaked enough that the laws differ, and the exact joint
    law of three sampled tokens under the target and under the drafts' mixture with ``weights``."""
    target = tiny_model("llama", seed=3, vocab_size=V_SMALL, num_hidden_layers=2, hidden_size=32,
                        intermediate_size=64)
    target.lm_head.weight.mul_(20.0)
    drafts = DraftEnsemble.from_base(target, 2, 1, seed=2, jitter=0.5)
    prompt = torch.tensor(PROMPT)
    seqs = torch.tensor(list(itertools.product(range(V_SMALL), repeat=3)))
    full = torch.cat([prompt.expand(len(seqs), -1), seqs], dim=1)

    def joint(log_probs):  # log_probs [N, 3, V] at the positions that predict x1, x2, x3
        return log_probs.gather(-1, seqs[..., None]).squeeze(-1).sum(-1).double().exp().numpy()

    p = joint(torch.log_softmax(target(full).logits[:, 2:5] / TEMPERATURE, -1))
    q = joint(torch.logsumexp(torch.log_softmax(drafts(full)[:, :, 2:5] / TEMPERATURE, -1)
                              + weights.log()[:, None, None, None], dim=0))
    return SmallVocab(target, drafts, prompt, p, q)


def chi_square_pvalue(counts: np.ndarray, law: np.ndarray) -> float:
    """Pearson's chi-square of observed counts against a law, cells with expected < 5 pooled."""
    expected = law / law.sum() * counts.sum()
    keep = expected >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    return float(stats.chisquare(obs, exp).pvalue)


def sequence_index(tokens: torch.Tensor) -> np.ndarray:
    """The cell of each row's three tokens ``[N, 3]`` in a ``[V³]`` law."""
    return (tokens[:, 0] * V_SMALL ** 2 + tokens[:, 1] * V_SMALL + tokens[:, 2]).numpy()
