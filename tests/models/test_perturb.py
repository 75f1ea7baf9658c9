"""Perturbation (TokUR's noise, design §5): bases, noise statistics and indexing, clean-KV semantics
against step-by-step HF decoding with the same noise, hooks removed, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from epikern.models.perturb import PROJECTIONS, Perturbation
from .helpers import hf_forward, tiny_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=3)


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 8), generator=gen)
    ids[1] = ids[0]  # two identical rows: their noise must still differ
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    return ids, mask


def _projection_io(model):
    """Forward hooks recording (input, output) of every perturbed projection: {(layer, name): [...]}."""
    records, handles = {}, []
    for l, layer in enumerate(model.get_decoder().layers):
        for name in PROJECTIONS:
            store = records.setdefault((l, name), [])
            hook = lambda mod, inp, out, store=store: store.append((inp[0].clone(), out.clone()))
            handles.append(getattr(layer.self_attn, name).register_forward_hook(hook))
    return records, handles


def test_bases_are_top_left_singular_vectors(llama):
    pert = Perturbation(llama, rank=5, sigma=0.1)
    for l, layer in enumerate(llama.get_decoder().layers):
        for name in PROJECTIONS:
            W = getattr(layer.self_attn, name).weight.double()
            U, S, _ = torch.linalg.svd(W, full_matrices=False)
            assert S[4] > S[5] * (1 + 1e-3)  # a gap, so the rank-5 subspace is well defined
            basis = pert.basis(l, name).double()
            assert basis.shape == (W.shape[0], 5) and pert.basis(l, name).dtype == torch.float32
            # column by column up to sign, and the same subspace
            torch.testing.assert_close((basis * U[:, :5]).sum(0).abs(), torch.ones(5, dtype=torch.float64), atol=1e-6, rtol=0)
            torch.testing.assert_close(basis @ basis.T, U[:, :5] @ U[:, :5].T, atol=1e-6, rtol=0)
    assert set(dict(pert.named_buffers())) == {"basis_q_proj", "basis_v_proj"}
    assert not any(k.startswith("model") for k in pert.state_dict())  # the model is referenced, not owned


def test_noise_covariance_is_sigma2_norm2_UUt(llama):
    """Layer 0 sees the same x in every row (one token, no past): out_perturbed − out_clean is the
    noise. Over n draws its covariance ≈ σ²‖x‖² U_r U_rᵀ, its mean ≈ 0, and it lies in span(U_r)."""
    sigma, rank, n = 0.3, 8, 4000
    pert = Perturbation(llama, rank=rank, sigma=sigma)
    ids = torch.tensor([[17]])
    records, handles = _projection_io(llama)
    try:
        pert.member_logits(ids, num_members=n + 1, generator=torch.Generator().manual_seed(1))
    finally:
        for h in handles:
            h.remove()
    for name in PROJECTIONS:
        (x, out), = records[(0, name)]
        x, out = x[:, 0].double(), out[:, 0].double()  # [1 + n, in], [1 + n, out]
        assert torch.equal(x, x[:1].expand_as(x))
        noise = out[1:] - out[:1]
        U = pert.basis(0, name).double()
        scale2 = sigma ** 2 * x[0].pow(2).sum()
        expected = scale2 * U @ U.T
        covariance = noise.T @ noise / n
        rel = torch.linalg.matrix_norm(covariance - expected) / torch.linalg.matrix_norm(expected)
        assert rel < 0.1, f"{name}: relative Frobenius error of the covariance {float(rel):.3f}"
        assert noise.mean(0).norm() < 0.1 * scale2.sqrt(), name  # E‖mean‖ = σ‖x‖·sqrt(r/n) ≈ 0.045 σ‖x‖
        outside = noise - noise @ U @ U.T
        assert outside.norm() < 1e-5 * noise.norm(), name


def test_noise_is_indexed_per_layer_member_row_and_token(llama, batch):
    """Every projection of every layer adds σ‖x‖ U_r ε with ε = noise[layer, q|v, member, row, t]:
    recovered from the recorded (x, y) as ε̂ = U_rᵀ (y − W x − b) / (σ ‖x‖)."""
    ids, mask = batch
    sigma, P = 0.2, 3
    pert = Perturbation(llama, rank=4, sigma=sigma)
    noise = pert.sample_noise(P, 2, 8, generator=torch.Generator().manual_seed(2))
    records, handles = _projection_io(llama)
    try:
        pert.member_logits(ids, mask, num_members=P + 1, noise=noise)
    finally:
        for h in handles:
            h.remove()
    for (l, name), [(x, y)] in records.items():
        proj = getattr(llama.get_decoder().layers[l].self_attn, name)
        added = (y - F.linear(x, proj.weight, proj.bias)).double()  # [(1 + P)·B, T, out]
        assert added[:2].abs().max() < 1e-6  # clean rows untouched
        eps = added[2:] @ pert.basis(l, name).double() / (sigma * x[2:].double().norm(dim=-1, keepdim=True))
        j = PROJECTIONS.index(name)
        torch.testing.assert_close(eps.view(P, 2, 8, -1), noise[l, j].double(), atol=1e-4, rtol=1e-4)
    # fresh draws: per layer, member, row (identical rows too) and token
    eps = noise.flatten(0, 1)  # [2L, P, B, T, r]
    assert (eps[0] - eps[1]).abs().min() > 0 and (eps[0] - eps[2]).abs().min() > 0
    assert (eps[:, 0] - eps[:, 1]).abs().min() > 0
    assert (eps[:, :, 0] - eps[:, :, 1]).abs().min() > 0
    assert (eps[..., 0, :] - eps[..., 1, :]).abs().min() > 0


def test_sigma_zero_is_the_clean_model_and_members_differ(llama, batch):
    ids, mask = batch
    real = mask.bool()
    clean = hf_forward(llama, ids, mask, None)
    zero = Perturbation(llama, rank=8, sigma=0.0).member_logits(ids, mask, num_members=4)
    assert zero.shape == (4, 2, 8, llama.config.vocab_size)
    for m in range(4):
        torch.testing.assert_close(zero[m][real], clean[real], atol=ATOL, rtol=0)
    pert = Perturbation(llama, rank=8, sigma=0.1)
    logits = pert.member_logits(ids, mask, num_members=4)
    torch.testing.assert_close(logits[0][real], clean[real], atol=1e-6, rtol=0)
    for a in range(4):
        for b in range(a + 1, 4):
            assert (logits[a] - logits[b]).abs()[real].amax(-1).min() > 1e-3, (a, b)  # every token differs
    # identical inputs in rows 0 and 1 (real columns 3..7), different noise
    assert (logits[1:, 0, 3:] - logits[1:, 1, 3:]).abs().amax(-1).min() > 1e-3
    # fresh noise each call; a seeded generator reproduces; include_clean=False is one perturbed teacher
    again = pert.member_logits(ids, mask, num_members=4)
    assert (again[1:] - logits[1:]).abs()[:, real].amax(-1).min() > 1e-3
    torch.testing.assert_close(again[0], logits[0], atol=0, rtol=0)
    t1 = pert.member_logits(ids, mask, num_members=1, include_clean=False, generator=torch.Generator().manual_seed(5))
    t2 = pert.member_logits(ids, mask, num_members=1, include_clean=False, generator=torch.Generator().manual_seed(5))
    assert t1.shape == (1, 2, 8, llama.config.vocab_size) and torch.equal(t1, t2)
    assert (t1[0] - clean).abs()[real].amax(-1).min() > 1e-3


def _decode_oracle(model, pert, ids, mask, noise):
    """Clean-KV semantics by definition, with HF's own attention: member p at column t is the clean
    model prefilled (DynamicCache) on columns < t, then token t alone with ``noise[:, :, p, :, t]``."""
    L, _, P, B, T, _ = noise.shape
    out = torch.full((P, B, T, model.config.vocab_size), float("nan"))
    for t in range(T):
        prefix = DynamicCache(config=model.config)
        if t:
            hf_forward(model, ids[:, :t], mask[:, :t], prefix)
        for p in range(P):
            handles = []
            for l, layer in enumerate(model.get_decoder().layers):
                for j, name in enumerate(PROJECTIONS):
                    def add(mod, inp, y, U=pert.basis(l, name), eps=noise[l, j, p, :, t]):
                        return y + pert.sigma * inp[0].norm(dim=-1, keepdim=True) * (eps[:, None, :] @ U.T)
                    handles.append(getattr(layer.self_attn, name).register_forward_hook(add))
            try:
                out[p, :, t] = hf_forward(model, ids[:, t:t + 1], mask[:, :t + 1], copy.deepcopy(prefix))[:, -1]
            finally:
                for h in handles:
                    h.remove()
    return out


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: sliding window 6 < T = 8
def test_clean_kv_semantics_equal_step_by_step_decoding(arch):
    model = tiny_model(arch, seed=4)
    gen = torch.Generator().manual_seed(3)
    B, T, P = 2, 8, 2
    ids = torch.randint(0, 128, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0
    real = mask.bool()
    pert = Perturbation(model, rank=4, sigma=0.5)
    noise = pert.sample_noise(P, B, T, generator=gen)
    full = pert.member_logits(ids, mask, num_members=P + 1, noise=noise)
    oracle = _decode_oracle(model, pert, ids, mask, noise)
    torch.testing.assert_close(full[1:, real], oracle[:, real], atol=ATOL, rtol=0)
    torch.testing.assert_close(full[0][real], hf_forward(model, ids, mask, None)[real], atol=ATOL, rtol=0)
    assert (full[1:] - full[:1]).abs()[:, real].amax(-1).min() > 1e-3  # the noise matters

    # decode-step API: the clean cache (prefilled by HF) plus P members for one new token per call,
    # then chunks of 3: the same numbers, and the cache ends up holding only the clean K/V
    for chunk in (1, 3):
        cache = DynamicCache(config=model.config)
        hf_forward(model, ids[:, :2], mask[:, :2], cache)
        for start in range(2, T, chunk):
            stop = min(T, start + chunk)
            step = pert(ids[:, start:stop], mask[:, :stop], cache=cache, noise=noise[..., start:stop, :])
            assert step.shape == (P + 1, B, stop - start, model.config.vocab_size)
            keep = real[:, start:stop]
            torch.testing.assert_close(step[:, keep], full[:, :, start:stop][:, keep], atol=ATOL, rtol=0)
        reference = DynamicCache(config=model.config)
        hf_forward(model, ids, mask, reference)
        assert cache.get_seq_length() == T
        for ours, theirs in zip(cache.layers, reference.layers):
            assert ours.keys.shape == theirs.keys.shape and ours.keys.shape[0] == B
            kept = real[:, -ours.keys.shape[2]:]  # a sliding-window layer keeps the last columns only
            for b in range(B):  # (padding columns hold no meaningful K/V)
                torch.testing.assert_close(ours.keys[b][:, kept[b]], theirs.keys[b][:, kept[b]], atol=ATOL, rtol=0)
                torch.testing.assert_close(ours.values[b][:, kept[b]], theirs.values[b][:, kept[b]], atol=ATOL, rtol=0)


def test_no_hooks_or_attention_switch_outside_calls(llama, batch):
    ids, mask = batch
    implementation = llama.config._attn_implementation
    clean = hf_forward(llama, ids, mask, None)
    pert = Perturbation(llama, rank=4, sigma=1.0)
    projections = [getattr(layer.self_attn, n) for layer in llama.get_decoder().layers for n in PROJECTIONS]
    assert not any(p._forward_hooks for p in projections)
    pert.member_logits(ids, mask, num_members=3)
    assert not any(p._forward_hooks for p in projections)
    assert llama.config._attn_implementation == implementation
    torch.testing.assert_close(hf_forward(llama, ids, mask, None), clean, atol=0, rtol=0)
    with pytest.raises(IndexError):  # a failure inside the forward (token id out of range) cleans up too
        pert.member_logits(ids + 1000, mask, num_members=3)
    assert not any(p._forward_hooks for p in projections)
    assert llama.config._attn_implementation == implementation
    torch.testing.assert_close(hf_forward(llama, ids, mask, None), clean, atol=0, rtol=0)


def test_bad_input_is_named(llama, batch):
    ids, mask = batch
    with pytest.raises(ValueError, match="rank must be an int >= 1, got 0"):
        Perturbation(llama, rank=0)
    with pytest.raises(ValueError, match=r"rank=25 exceeds min\(out, in\) = 24"):  # v_proj is 24 x 48
        Perturbation(llama, rank=25)
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0, got -0.1"):
        Perturbation(llama, sigma=-0.1)
    with pytest.raises(ValueError, match="got nan"):
        Perturbation(llama, sigma=float("nan"))
    with pytest.raises(TypeError, match="Linear has no decoder layers"):
        Perturbation(torch.nn.Linear(3, 3))
    pert = Perturbation(llama, rank=2, sigma=0.1)
    with pytest.raises(ValueError, match="num_members must be an int >= 1, got 0"):
        pert.member_logits(ids, mask, num_members=0)
    with pytest.raises(ValueError, match="noise must hold P = 2"):
        pert.member_logits(ids, mask, num_members=3, noise=pert.sample_noise(1, 2, 8))
    with pytest.raises(ValueError, match=r"noise must be \[L, 2, P, B, T, r\] = \[4, 2, P, 2, 8, 2\], got \(4, 2, 1, 2, 7, 2\)"):
        pert(ids, mask, noise=pert.sample_noise(1, 2, 7))
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, past \+ T\] = \[2, 8\]"):
        pert(ids, mask[:, 1:], noise=pert.sample_noise(1, 2, 8))
