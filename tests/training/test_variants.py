"""Drafts beyond the paper on the micro target: layer-skip init, posterior-sample distillation (PSD),
more responses per prompt, and the recipes of earlier runs unchanged by the new options."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from epikern.models import DraftEnsemble
from epikern.models.loading import load_causal_lm
from epikern.models.perturb import Perturbation
from epikern.training.batches import collate
from epikern.training.config import DraftsRecipe, from_dict, to_dict
from epikern.training.drafts import build_draft, draft_source_layers, posterior_sample_noise, train_drafts
from epikern.training.losses import CleanTeacher, PosteriorSampleTeacher
from epikern.training.responses import read_responses
from epikern.training.target import heldout_examples, read_heldout

from .conftest import micro_drafts


def test_layer_skip_branch_equals_the_targets_last_layers(micro_target):
    target, _ = load_causal_lm(micro_target[0])  # 3 layers
    assert draft_source_layers(6, 2, 2, True) == [0, 1, 4, 5] and draft_source_layers(6, 2, 2, False) == [0, 1, 2, 3]
    draft = build_draft(target, shared_layers=1, branch_layers=1, seed=0, jitter=0.0, layer_skip=True)
    source = dict(target.named_parameters())
    for name, p in draft.named_parameters():
        origin = name.replace("layers.1.", "layers.2.")  # draft layer 1 is the target's last layer
        assert torch.equal(p, source[origin if "layers." in name else name]), name
    assert not torch.equal(draft.model.layers[1].mlp.up_proj.weight, target.model.layers[1].mlp.up_proj.weight)
    assert [n for n, p in draft.named_parameters() if not p.requires_grad] == \
        [n for n in dict(draft.named_parameters()) if n.startswith(("model.embed_tokens.", "model.layers.0."))]


def test_psd_teacher_noise_is_fixed_per_draft_and_differs_across_drafts(micro_target):
    target, tok = load_causal_lm(micro_target[0])
    perturbation = Perturbation(target, rank=4, sigma=0.3)
    examples = heldout_examples(read_heldout(micro_target[0] / "heldout.jsonl"))[:4]
    batch = collate(examples, tok.pad_token_id)
    noise = {k: posterior_sample_noise(perturbation, seed=k) for k in (0, 1)}
    assert noise[0].shape == (3, 2, 4) and torch.equal(noise[0], posterior_sample_noise(perturbation, seed=0))
    assert not torch.equal(noise[0], noise[1])
    teachers = {k: PosteriorSampleTeacher(perturbation, noise[k], cache=False) for k in (0, 1)}
    rows = {k: t(batch, examples) for k, t in teachers.items()}
    torch.testing.assert_close(teachers[0](batch, examples), rows[0], rtol=0, atol=0)  # fixed: same logits again
    clean = CleanTeacher(target, cache=False)(batch, examples)
    assert (rows[0] - rows[1]).abs().max() > 1e-3 and (rows[0] - clean).abs().max() > 1e-3
    # the fixed ε is one member of TokUR's family: the same as member_logits with that ε at every token
    B, T = batch["input_ids"].shape
    eps = noise[0][:, :, None, None, None, :].expand(3, 2, 1, B, T, 4)
    member = perturbation.member_logits(batch["input_ids"], batch["attention_mask"], num_members=1,
                                        include_clean=False, noise=eps.contiguous())[0]
    torch.testing.assert_close(rows[0], member[batch["labels"] != -100], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[L, 2, r\]"):
        PosteriorSampleTeacher(perturbation, torch.zeros(3, 2, 5))


def test_psd_and_layer_skip_drafts_train_and_load(micro_target, tmp_path):
    target_dir, _ = micro_target
    out = {}
    for name, changes in (("psd", dict(psd=True, idd=True, sigma=0.3)), ("skip", dict(layer_skip=True)),
                          ("clean", dict(idd=True))):
        summary = train_drafts(micro_drafts(target_dir, **changes), tmp_path / name, progress=False)
        assert all(d["final_loss"] < d["first_loss"] for d in summary["drafts"]), summary
        out[name] = DraftEnsemble.from_pretrained(tmp_path / name)
    recipe = json.loads((tmp_path / "psd" / "recipe.json").read_text())
    assert recipe["psd"] is True and "layer_skip" not in recipe
    # IDD drafts differ only by seed; PSD drafts also by teacher, so they disagree more
    from epikern.training.diagnostics import mean_jsd

    target, tok = load_causal_lm(target_dir)
    examples = heldout_examples(read_heldout(target_dir / "heldout.jsonl"))
    jsd = {k: mean_jsd(target, out[k], examples, pad_id=tok.pad_token_id) for k in ("psd", "clean")}
    assert jsd["psd"] > jsd["clean"], jsd


def test_more_responses_adds_samples_to_every_stored_prompt(micro_target, tmp_path):
    target_dir, _ = micro_target
    stored = read_responses(target_dir / "responses.jsonl")
    recipe = micro_drafts(target_dir, more_responses=2, train=dataclasses.replace(micro_drafts(target_dir).train, steps=2))
    summary = train_drafts(recipe, tmp_path / "more", progress=False)
    grown = read_responses(tmp_path / "more" / "responses.jsonl")
    assert summary["responses"] == len(grown) == 2 * len(stored)  # R = 2 stored + 2 new per prompt
    assert grown[:len(stored)] == stored
    for p in {r.prompt for r in stored}:
        mine = [r for r in grown if r.prompt == p]
        assert sorted(r.sample for r in mine) == [0, 1, 2, 3] and len({r.question for r in mine}) == 1


def test_new_options_leave_earlier_recipes_and_cache_keys_unchanged():
    plain = DraftsRecipe(target="t")
    assert not {"layer_skip", "psd", "more_responses"} & set(to_dict(plain))
    assert from_dict(DraftsRecipe, to_dict(plain)) == plain
    psd = dataclasses.replace(plain, psd=True, more_responses=3)
    assert to_dict(psd)["psd"] is True and from_dict(DraftsRecipe, to_dict(psd)) == psd
    with pytest.raises(ValueError, match="choose one"):
        dataclasses.replace(plain, osd=True, psd=True)
    with pytest.raises(ValueError, match="more_responses"):
        dataclasses.replace(plain, more_responses=-1)
