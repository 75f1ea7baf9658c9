"""DraftEnsemble against K separate HF models, the cache contract, construction and persistence."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from epikern.models import DraftCache, DraftEnsemble
from epikern.models.layers import FUSED
from .helpers import drafts_sharing_trunk, hf_caches, hf_forward, tiny_model

ATOL = 1e-5


def _inputs(vocab, batch, length, left_pad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, n in enumerate(left_pad):
        mask[b, :n] = 0
    return ids, mask


@pytest.mark.parametrize("arch,num_drafts,shared,left_pad", [
    ("llama", 2, 0, (0, 0)),
    ("llama", 3, 2, (0, 3)),
    ("llama", 2, 4, (2, 0)),
    ("qwen2", 2, 1, (0, 2)),
    ("mistral", 2, 1, (0, 2)),   # sliding window 6 < 7 + 20 tokens
])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-step", "pytorch-step"])  # epikern.models.fused_step
def test_matches_separate_hf_models(arch, num_drafts, shared, left_pad, fused):
    models = drafts_sharing_trunk(tiny_model(arch), num_drafts, shared)
    ens = DraftEnsemble.from_models(models, shared_layers=shared)
    ens.fused_decode = fused
    V = ens.vocab_size
    ids, mask = _inputs(V, 2, 7, left_pad)
    padded = any(left_pad)
    cache, caches = ens.new_cache(2), hf_caches(models)
    out = ens(ids, mask if padded else None, cache)
    ref = torch.stack([hf_forward(m, ids, mask if padded else None, c) for m, c in zip(models, caches)])
    real = mask.bool()
    assert out.shape == (num_drafts, 2, 7, V)
    torch.testing.assert_close(out[:, real], ref[:, real], atol=ATOL, rtol=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        nxt = torch.randint(0, V, (2, 1), generator=gen)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        out = ens(nxt, mask if padded else None, cache)
        ref = torch.stack([hf_forward(m, nxt, mask if padded else None, c) for m, c in zip(models, caches)])
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert cache.get_seq_length() == 27


@pytest.mark.parametrize("shared", [0, 1, 3, 4])
def test_cache_holds_trunk_once_and_branches_per_draft(shared):
    K, B, P = 3, 2, 9
    models = drafts_sharing_trunk(tiny_model(), K, shared)
    ens = DraftEnsemble.from_models(models, shared_layers=shared)
    cfg = models[0].config
    ids, _ = _inputs(cfg.vocab_size, B, P, (0, 0))
    cache, caches = ens.new_cache(B), hf_caches(models)
    assert ens.cache_nbytes(cache) == 0
    ens(ids, None, cache)
    for m, c in zip(models, caches):
        hf_forward(m, ids, None, c)
    L = cfg.num_hidden_layers
    one_layer = 2 * B * cfg.num_key_value_heads * P * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert ens.cache_nbytes(cache) == (shared + K * (L - shared)) * one_layer
    hf_bytes = sum(layer.keys.nbytes + layer.values.nbytes for c in caches for layer in c.layers)
    assert hf_bytes == K * L * one_layer


def test_crop_then_redecode_equals_fresh_run():
    K, S = 3, 2
    ens = DraftEnsemble.from_models(drafts_sharing_trunk(tiny_model(), K, S), shared_layers=S)
    V = ens.vocab_size
    ids, mask = _inputs(V, 2, 12, (0, 2))
    cache = ens.new_cache(2)
    ens(ids[:, :6], mask[:, :6], cache)
    for t in range(6, 10):
        ens(ids[:, t:t + 1], mask[:, :t + 1], cache)
    cache.crop(-3)                                   # reject 3 speculated tokens
    assert cache.get_seq_length() == 7
    redo = ens(ids[:, 7:10], mask[:, :10], cache)    # verify a 3-token chunk at once
    last = ens(ids[:, 10:12], mask[:, :12], cache)
    fresh = ens(ids, mask)
    torch.testing.assert_close(redo, fresh[:, :, 7:10], atol=ATOL, rtol=0)
    torch.testing.assert_close(last, fresh[:, :, 10:12], atol=ATOL, rtol=0)


def test_stacked_kv_layer_writes_in_place_and_matches_concatenation():
    """The growing buffer holds what DynamicLayer's concatenation holds, through updates past its
    capacity, crops, batch selection and gradient-carrying inputs."""
    from transformers.cache_utils import DynamicLayer

    from epikern.models.cache import StackedKVLayer

    gen = torch.Generator().manual_seed(0)
    ours, ref = StackedKVLayer(), DynamicLayer()
    steps = [("update", 5), ("update", 1), ("crop", 2), ("update", 3), ("update", 70), ("crop", 40),
             ("select", None), ("update", 2), ("update", 1)]
    B = 3
    for op, n in steps:
        if op == "update":
            k, v = (torch.randn(2, B, 2, n, 4, generator=gen) for _ in range(2))
            got, want = ours.update(k, v), ref.update(k, v)
            for a, b in zip(got, want):
                assert torch.equal(a, b)
        elif op == "crop":
            ours.crop(-n)
            ref.crop(-n)
        else:  # keep rows 0 and 2 (DynamicLayer's batch dim is 0; ours is 1, behind the group dim)
            ours.batch_select_indices(torch.tensor([0, 2]))
            ref.keys, ref.values = ref.keys[:, [0, 2]], ref.values[:, [0, 2]]
            B = 2
        assert ours.get_seq_length() == ref.get_seq_length()
        assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)
    assert ours._key_buffer.shape[-2] > ours.get_seq_length()  # room left: the next step writes in place
    k = torch.randn(2, B, 2, 1, 4, requires_grad=True)
    with torch.enable_grad():  # with grad, concatenation: autograd reaches the new keys
        keys, _ = ours.update(k, k.detach())
        keys.sum().backward()
    assert torch.equal(k.grad, torch.ones_like(k))


def test_rotary_table_lookup_equals_the_hf_module():
    ens = DraftEnsemble.from_base(tiny_model(), num_drafts=2, shared_layers=1)
    x = torch.randn(2, 3, 8)
    positions = torch.tensor([[0, 5, 9], [3, 4, 400]])  # 400: beyond max_position_embeddings
    table = ens._rotary(x, positions, 401)
    for a, b in zip(table, ens.rotary_emb(x, positions)):
        assert torch.equal(a, b)
    assert ens._rotary_table[0].shape[0] >= 401


def test_batch_select_reorder_and_repeat_follow_hf_conventions():
    K, S = 2, 1
    ens = DraftEnsemble.from_models(drafts_sharing_trunk(tiny_model(), K, S), shared_layers=S)
    ids, mask = _inputs(ens.vocab_size, 3, 8, (0, 3, 1))
    cache = ens.new_cache(3)
    ens(ids[:, :7], mask[:, :7], cache)
    keep = torch.tensor([2, 0])
    cache.batch_select_indices(keep)
    assert cache.batch_size == 2
    step = ens(ids[keep, 7:], mask[keep], cache)
    torch.testing.assert_close(step, ens(ids[keep], mask[keep])[:, :, 7:], atol=ATOL, rtol=0)

    cache = ens.new_cache(3)
    ens(ids[:, :7], mask[:, :7], cache)
    order = torch.tensor([1, 1, 0])
    cache.reorder_cache(order)
    step = ens(ids[order, 7:], mask[order], cache)
    torch.testing.assert_close(step, ens(ids[order], mask[order])[:, :, 7:], atol=ATOL, rtol=0)
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 6 and cache.layers[-1].keys.shape[:2] == (K, 6)


def test_uncached_forward_logits_to_keep_and_errors():
    ens = DraftEnsemble.from_models(drafts_sharing_trunk(tiny_model(), 2, 1), shared_layers=1)
    ids, mask = _inputs(ens.vocab_size, 2, 5, (0, 1))
    full = ens(ids, mask)
    torch.testing.assert_close(ens(ids, mask, logits_to_keep=2), full[:, :, -2:], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, past \+ new tokens\] = \[2, 5\]"):
        ens(ids, mask[:, :4])
    with pytest.raises(ValueError, match="does not match this ensemble"):
        ens(ids, mask, ens.new_cache(3))
    with pytest.raises(TypeError, match="DraftCache"):
        ens(ids, mask, object())
    with pytest.raises(ValueError, match="shared_layers must be in"):
        DraftCache(4, 2, 5, 1)


def test_from_models_names_first_differing_shared_tensor():
    base = tiny_model()
    models = drafts_sharing_trunk(base, 2, 3)
    with torch.no_grad():
        models[1].get_decoder().layers[1].self_attn.k_proj.weight.add_(1e-3)
    DraftEnsemble.from_models(models, shared_layers=1)
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' differs between model 1"):
        DraftEnsemble.from_models(models, shared_layers=3)
    with torch.no_grad():
        models[1].get_decoder().embed_tokens.weight[0, 0] += 1
    with pytest.raises(ValueError, match=r"'model\.embed_tokens\.weight' differs"):
        DraftEnsemble.from_models(models, shared_layers=0)
    with pytest.raises(ValueError, match=r"config\.hidden_size"):
        DraftEnsemble.from_models([base, tiny_model(hidden_size=32)], shared_layers=0)


def test_from_base_clones_and_jitters_branches_only():
    base = tiny_model()
    ids, _ = _inputs(base.config.vocab_size, 2, 6, (0, 0))
    ref = hf_forward(base, ids, None, None)
    clones = DraftEnsemble.from_base(base, num_drafts=3, shared_layers=2)
    torch.testing.assert_close(clones(ids), ref.expand(3, -1, -1, -1), atol=ATOL, rtol=0)
    a = DraftEnsemble.from_base(base, num_drafts=3, shared_layers=2, seed=7, jitter=0.05)
    b = DraftEnsemble.from_base(base, num_drafts=3, shared_layers=2, seed=7, jitter=0.05)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(a.trunk_parameters(), clones.trunk_parameters()):
        assert torch.equal(p, q)
    head = a.lm_head_weight
    assert not torch.equal(head[0], head[1]) and not torch.equal(head[0], clones.lm_head_weight[0])
    n_all = sum(p.numel() for p in a.parameters())
    assert n_all == sum(p.numel() for p in a.trunk_parameters()) + sum(p.numel() for p in a.branch_parameters())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_load_round_trip_stores_trunk_once(tmp_path, arch):
    K, S = 3, 2
    ens = DraftEnsemble.from_base(tiny_model(arch), num_drafts=K, shared_layers=S, seed=3, jitter=0.1)
    ens.save_pretrained(str(tmp_path))
    meta = json.loads((tmp_path / "draft_ensemble.json").read_text())
    assert (meta["num_drafts"], meta["shared_layers"], meta["config"]["model_type"]) == (K, S, arch)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        groups = {k: f.get_slice(k).get_shape()[0] for k in f.keys() if k.startswith("layers.")}
    for key, g in groups.items():
        assert g == (1 if int(key.split(".")[1]) < S else K), key
    loaded = DraftEnsemble.from_pretrained(str(tmp_path))
    assert (loaded.num_drafts, loaded.shared_layers, loaded.vocab_size) == (K, S, ens.vocab_size)
    ids, mask = _inputs(ens.vocab_size, 2, 5, (1, 0))
    assert torch.equal(loaded(ids, mask), ens(ids, mask))
    assert loaded.biases == ens.biases
    half = DraftEnsemble.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    out = half(ids, mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float()[:, mask.bool()], ens(ids, mask)[:, mask.bool()], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_an_unfused_state_dict_loads_into_the_fused_projections(tmp_path, arch):
    """Checkpoints saved before q/k/v and gate/up were fused (format 1) still load, to the same model."""
    ens = DraftEnsemble.from_base(tiny_model(arch), num_drafts=2, shared_layers=1, seed=3, jitter=0.1)
    old = {}
    for key, value in ens.state_dict().items():
        prefix, _, name = key.rpartition(".")
        layer = ens.get_submodule(prefix) if prefix.startswith("layers.") else None
        fused = name.rsplit("_", 1)[0] if layer is not None else None
        if fused in ("qkv", "gate_up"):
            kind = name.rsplit("_", 1)[1]
            for hf_name in FUSED[fused]:
                weight, bias = layer.projection(hf_name)
                old[f"{prefix}.{hf_name.split('.')[-1].removesuffix('_proj')}_{kind}"] = weight if kind == "weight" else bias
        else:
            old[key] = value
    assert "layers.0.q_weight" in old and "layers.0.qkv_weight" not in old
    ens.save_pretrained(str(tmp_path))
    save_file({k: v.detach().contiguous() for k, v in old.items()}, str(tmp_path / "model.safetensors"))
    loaded = DraftEnsemble.from_pretrained(str(tmp_path))
    for (name, a), b in zip(ens.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_fused_projections_need_all_or_no_biases():
    config = tiny_model().config
    with pytest.raises(ValueError, match="either all or none of them may have a bias"):
        DraftEnsemble(config, 2, 1, biases={"self_attn.q_proj", "self_attn.k_proj"})


def test_unsupported_layouts_are_rejected():
    import transformers

    qwen3 = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8))
    with pytest.raises(ValueError, match=r"unsupported decoder layer layout .*self_attn\.q_norm\.weight"):
        DraftEnsemble.from_models([qwen3], shared_layers=0)
    sliding = tiny_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(ValueError, match="full-attention layers only"):
        DraftEnsemble.from_models([sliding], shared_layers=0)


def test_branches_train_with_a_frozen_trunk():
    ens = DraftEnsemble.from_base(tiny_model(), num_drafts=2, shared_layers=2, seed=0, jitter=0.05)
    ids, mask = _inputs(ens.vocab_size, 2, 6, (0, 2))
    for p in ens.trunk_parameters():
        p.requires_grad_(False)
    with torch.enable_grad():
        logits = ens(ids, mask)
        loss = torch.nn.functional.cross_entropy(logits[:, :, :-1].flatten(0, 2), ids[:, 1:].repeat(2, 1).flatten())
        loss.backward()
    assert all(p.grad is None for p in ens.trunk_parameters())
    grads = [p.grad for p in ens.branch_parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_top_level_exports():
    import epikern as ek
    from epikern.models import DraftEstimator

    assert ek.DraftEnsemble is DraftEnsemble and ek.DraftEstimator is DraftEstimator
    from epikern.models import Perturbation, TokUR
    assert ek.TokUR is TokUR and ek.Perturbation is Perturbation


def test_select_keeps_the_chosen_drafts_and_shares_the_trunk():
    base = tiny_model("llama")
    ens = DraftEnsemble.from_models(drafts_sharing_trunk(base, 3, 2), shared_layers=2)
    ids, mask = _inputs(ens.vocab_size, 2, 7, left_pad=(0, 2))
    full = ens(ids, mask)
    sub = ens.select([2, 0])
    assert sub.num_drafts == 2 and sub.embed_tokens.weight is ens.embed_tokens.weight
    torch.testing.assert_close(sub(ids, mask), full[[2, 0]], atol=0, rtol=0)
    cache = sub.new_cache(2)
    assert len(cache.layers) == ens.num_layers and sub.cache_nbytes(cache) == 0
    with pytest.raises(ValueError, match=r"indices in \[0, 3\)"):
        ens.select([3])
    with pytest.raises(ValueError, match="non-empty"):
        ens.select([])
