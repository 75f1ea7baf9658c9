"""epikern.eval.cost: analytic FLOPs against FlopCounterMode (exact relations), latency, memory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers
from transformers import DynamicCache

import epikern as ek
from epikern.eval import cost
from tests.models.helpers import drafts_sharing_trunk, hf_forward, tiny_model

# tiny llama of tests.models.helpers: V=160, H=48, I=96, L=4, 4 heads of 12, 2 kv heads
V, H, I, L, HEADS, KV, D = 160, 48, 96, 4, 4, 2, 12


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_llama_formula_by_hand_gqa_and_tied_embeddings():
    per_layer = H * HEADS * D + 2 * H * KV * D + HEADS * D * H + 3 * H * I
    c = 9
    expected = 2 * (L * per_layer + V * H) + L * 4 * c * HEADS * D
    untied, tied = tiny_model("llama"), tiny_model("llama", tie_word_embeddings=True)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    for source in (untied, untied.config, tied, tied.config):  # the tied LM head is still a matmul
        assert cost.lm_flops_per_token(source, c) == expected


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_forward_counted_equals_analytic(attn):
    """Prefill of T tokens counts T·F(T) (the full T×T scores); a decode step counts F(past + 1)."""
    model = tiny_model("llama", attn_implementation=attn)
    B, T = 2, 7
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :2] = 0  # left padding does not change what is computed
    cache = DynamicCache(config=model.config)
    _, total, per_op = cost.count_flops(hf_forward, model, ids, mask, cache)
    assert total == B * T * cost.lm_flops_per_token(model, T)
    attention = per_op.get("aten._scaled_dot_product_flash_attention_for_cpu", per_op.get("aten.bmm"))
    assert attention == B * T * L * 4 * T * HEADS * D
    step_mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
    _, total, _ = cost.count_flops(hf_forward, model, ids[:, -1:], step_mask, cache)
    assert total == B * cost.lm_flops_per_token(model.config, T + 1)


def test_gpt2_model_is_counted_from_its_modules():
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (1, 6))
    _, total, _ = cost.count_flops(model, ids)
    assert total == 6 * cost.lm_flops_per_token(model, 6)
    with pytest.raises(ValueError, match="pass the model"):
        cost.lm_flops_per_token(config, 6)


def test_sliding_window_caps_the_attended_keys():
    config = transformers.MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                        sliding_window=6)
    per_key = 3 * 4 * 32  # layers · 4 · d_attn
    assert cost.lm_flops_per_token(config, 20) - cost.lm_flops_per_token(config, 6) == 0
    assert cost.lm_flops_per_token(config, 6) - cost.lm_flops_per_token(config, 2) == 4 * per_key


def test_draft_ensemble_counted_equals_analytic():
    base = tiny_model("llama")
    K, S = 3, 2
    ens = ek.DraftEnsemble.from_models(drafts_sharing_trunk(base, K, S), S)
    B, T = 2, 5
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    cache = ens.new_cache(B)
    _, total, _ = cost.count_flops(ens, ids, cache=cache)
    assert total == B * T * cost.draft_ensemble_flops_per_token(ens, T)
    _, total, _ = cost.count_flops(ens, ids[:, :1], torch.ones(B, T + 1, dtype=torch.long), cache=cache)
    assert total == B * cost.draft_ensemble_flops_per_token(ens, T + 1)
    # trunk once + K branches + K heads, by hand
    per_layer = H * HEADS * D + 2 * H * KV * D + HEADS * D * H + 3 * H * I
    c = 4.5
    assert cost.draft_ensemble_flops_per_token(ens, c) == (
        2 * (S * per_layer + K * (L - S) * per_layer + K * V * H) + 4 * (S + K * (L - S)) * c * HEADS * D)
    # one draft is the plain model
    one = ek.DraftEnsemble.from_models([base], shared_layers=L)
    assert cost.draft_ensemble_flops_per_token(one, c) == cost.lm_flops_per_token(base, c)
    with pytest.raises(TypeError, match="draft_ensemble_flops_per_token"):
        cost.lm_flops_per_token(ens, 3)
    with pytest.raises(TypeError, match="DraftEnsemble"):
        cost.draft_ensemble_flops_per_token(base, 3)


@pytest.mark.parametrize("has_target,decompose", [(True, True), (True, False), (False, True)])
def test_uncertainty_op_flops(has_target, decompose):
    K, N, Vu = 4, 6, 1000
    draft = torch.randn(K, 2, 3, Vu)
    target = torch.randn(2, 3, Vu) if has_target else None
    _, total, per_op = cost.count_flops(ek.draft_uncertainty, draft, target, decompose=decompose)
    expected = cost.draft_uncertainty_flops(K, N, Vu, has_target, decompose)
    assert total == per_op["epikern.draft_uncertainty"] == expected
    t = int(has_target)
    assert expected == N * Vu * (K * (7 + 2 * t) + 7 * t + decompose * (12 * K + 4 + 6 * t))


def test_ensemble_uncertainty_and_a_plain_counter_after_registration():
    from torch.utils.flop_counter import FlopCounterMode

    cost.register_flop_formulas()
    member = torch.randn(5, 8, 300)
    with FlopCounterMode(display=False) as counter:
        ek.ensemble_uncertainty(member)
    assert counter.get_total_flops() == cost.draft_uncertainty_flops(5, 8, 300, False, True) > 0


def test_context_checks_and_mean_decode_context():
    model = tiny_model("llama")
    assert cost.mean_decode_context(10, 5) == 13.0
    # the mean of F over the generated positions is F at the mean context (F is affine in c)
    mean_f = sum(cost.lm_flops_per_token(model, 10 + i) for i in range(1, 6)) / 5
    assert cost.lm_flops_per_token(model, cost.mean_decode_context(10, 5)) == pytest.approx(mean_f)
    for bad in (0, -1, True, "8", float("nan")):
        with pytest.raises(ValueError, match="context_len"):
            cost.lm_flops_per_token(model, bad)
    with pytest.raises(ValueError, match="new_tokens"):
        cost.mean_decode_context(3, 0)


def test_peak_memory_cpu_sees_torch_allocations():
    """In a fresh interpreter: memory the allocator already holds from earlier work (as in a long
    test session) is reused without raising the resident set, which the docstring says."""
    code = """
import torch
from epikern.eval import cost
n = 12_500_000  # 50 MB of float32, written (so resident)
def fn():
    x = torch.ones(n)
    y = x + 1  # a second 50 MB buffer alive at the same time
    return float(y[0])
result, peak = cost.peak_memory(fn, device="cpu")
_, small = cost.peak_memory(lambda: torch.ones(10).sum())
print(result, peak.method, peak.bytes, small.bytes)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    result, method, peak, small = float(out[0]), out[1], int(out[2]), int(out[3])
    assert result == 2.0
    assert method == "rss_high_water_mark"
    assert 95e6 < peak < 300e6
    assert small < 50e6