"""The fused CPU decode step (epikern/models/fused_step.py) against the PyTorch path and HF."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from epikern.models import DraftEnsemble
from epikern.models import fused_step
from .helpers import drafts_sharing_trunk, hf_caches, hf_forward, tiny_model

ATOL = 1e-5


def _ensemble(arch="llama", num_drafts=3, shared=1, **overrides):
    models = drafts_sharing_trunk(tiny_model(arch, **overrides), num_drafts, shared)
    return DraftEnsemble.from_models(models, shared_layers=shared), models


def _decode(ens, fused, prompt, mask, steps, keep=0):
    """Prefill, then decode ``steps`` (token tensors ``[B, T]``), with the fused step on or off.
    Returns the logits of every call and the cache."""
    ens.fused_decode = fused
    cache = ens.new_cache(prompt.shape[0])
    outs = [ens(prompt, mask, cache)]
    for ids in steps:
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        outs.append(ens(ids, mask, cache, logits_to_keep=keep))
    return outs, cache


@pytest.mark.parametrize("arch,num_drafts,shared,left_pad,widths,keep", [
    ("llama", 3, 1, (0, 3, 1), (1,) * 20, 0),
    ("llama", 1, 0, (0, 0, 0), (1, 2, 5, 1, 3, 9, 16), 0),
    ("llama", 4, 4, (2, 0, 0), (2, 3, 1, 4), 1),         # all layers shared: the trunk feeds every head
    ("llama", 2, 0, (0, 4, 0), (5, 1, 2), 2),
    ("qwen2", 3, 2, (0, 2, 5), (1, 3, 1, 2), 0),          # q/k/v biases, one kv head
    ("llama", 2, 1, (1, 0, 0), (1, 2, 1), 0),
])
def test_fused_step_equals_the_pytorch_path(arch, num_drafts, shared, left_pad, widths, keep):
    ens, _ = _ensemble(arch, num_drafts, shared)
    gen = torch.Generator().manual_seed(0)
    B, V = 3, ens.vocab_size
    prompt = torch.randint(0, V, (B, 9), generator=gen)
    mask = torch.ones(B, 9, dtype=torch.long)
    for b, n in enumerate(left_pad):
        mask[b, :n] = 0
    steps = [torch.randint(0, V, (B, w), generator=gen) for w in widths]
    mask = mask if any(left_pad) else None
    ref, ref_cache = _decode(ens, False, prompt, mask, steps, keep)
    out, cache = _decode(ens, True, prompt, mask, steps, keep)
    for a, b in zip(out, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 9 + sum(widths)
    for layer, ref_layer in zip(cache.layers, ref_cache.layers):
        torch.testing.assert_close(layer.keys, ref_layer.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.values, ref_layer.values, atol=ATOL, rtol=0)


def test_fused_step_runs_in_decoding_and_matches_hf_models():
    """The design §4 equivalence (K separate HF models, 20 decode steps, padding) on the fused path, and
    proof that it is the path taken: the kernel is called once per decode step."""
    ens, models = _ensemble("llama", 3, 2)
    calls = []
    kernel = fused_step._cpu.stacked_decode_step

    class Spy:
        def stacked_decode_step(self, *args):
            calls.append(args[7])  # T
            return kernel(*args)

    B, V = 2, ens.vocab_size
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (B, 6), generator=gen)
    mask = torch.ones(B, 6, dtype=torch.long)
    mask[1, :2] = 0
    cache, caches = ens.new_cache(B), hf_caches(models)
    ens(ids, mask, cache)
    [hf_forward(m, ids, mask, c) for m, c in zip(models, caches)]
    real_cpu = fused_step._cpu
    fused_step._cpu = Spy()
    try:
        for _ in range(20):
            nxt = torch.randint(0, V, (B, 1), generator=gen)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
            out = ens(nxt, mask, cache)
            ref = torch.stack([hf_forward(m, nxt, mask, c) for m, c in zip(models, caches)])
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    finally:
        fused_step._cpu = real_cpu
    assert calls == [1] * 20


def test_what_the_fused_step_declines():
    ens, _ = _ensemble()
    ids = torch.randint(0, ens.vocab_size, (1, 4))
    cache = ens.new_cache(1)
    one = ids[:, :1]
    assert not fused_step.fusable(ens, ids, cache, 0)                     # a prefill (empty cache)
    ens(ids, None, cache)
    assert fused_step.fusable(ens, one, cache, 4)
    assert not fused_step.fusable(ens, one, None, 4)                      # no cache
    assert not fused_step.fusable(ens, ids.repeat(1, 5), cache, 4)        # more than MAX_TOKENS
    with torch.enable_grad():
        assert not fused_step.fusable(ens, one, cache, 4)                 # autograd on trainable weights
        ens.requires_grad_(False)
        assert fused_step.fusable(ens, one, cache, 4)
    with FlopCounterMode(display=False):                                  # it must see the matmuls
        assert not fused_step.fusable(ens, one, cache, 4)
    ens.fused_decode = False
    assert not fused_step.fusable(ens, one, cache, 4)
    ens.fused_decode = True
    ens.to(torch.float64)                                                 # _apply forgets the layout check
    assert not fused_step.fusable(ens, one, cache, 4)
    ens.to(torch.float32)
    assert fused_step.fusable(ens, one, cache, 4)
    mistral, _ = _ensemble("mistral")                                     # sliding window
    assert not fused_step.fusable(mistral, one, cache, 4)
    gelu, _ = _ensemble(hidden_act="gelu")
    assert not fused_step.fusable(gelu, one, cache, 4)


def test_bad_token_or_position_raises_and_leaves_the_cache_as_it_was():
    ens, _ = _ensemble()
    V = ens.vocab_size
    cache = ens.new_cache(2)
    ens(torch.randint(0, V, (2, 5)), None, cache)
    keys = [layer.keys.clone() for layer in cache.layers]
    with pytest.raises(IndexError, match="token id"):
        ens(torch.tensor([[1], [V]]), None, cache)
    with pytest.raises(IndexError, match="position"):
        ens(torch.tensor([[1], [2]]), None, cache, position_ids=torch.tensor([[5], [10 ** 6]]))
    with pytest.raises(ValueError, match="attention_mask"):
        ens(torch.tensor([[1], [2]]), torch.ones(2, 5, dtype=torch.long), cache)
    assert cache.get_seq_length() == 5
    for layer, before in zip(cache.layers, keys):
        torch.testing.assert_close(layer.keys, before, atol=0, rtol=0)
    ens(torch.tensor([[1], [2]]), None, cache)  # and decoding goes on
    assert cache.get_seq_length() == 6


def test_mask_dtypes_and_strides_read_alike():
    ens, _ = _ensemble()
    V = ens.vocab_size
    prompt = torch.randint(0, V, (2, 6))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    outs = []
    for m in (mask, mask.bool(), torch.stack([mask, mask], -1)[..., 0]):  # last: stride 2
        cache = ens.new_cache(2)
        ens(prompt, mask[:, :6], cache)
        outs.append(ens(torch.tensor([[3], [4]]), m, cache))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=0, rtol=0)
