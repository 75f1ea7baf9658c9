"""DDD and IDD drafts on the micro target: partitions, the DraftEnsemble, disagreement, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from epikern.models import DraftEnsemble
from epikern.models.loading import CheckpointError, load_causal_lm
from epikern.training.checkpoint import load_checkpoint
from epikern.training.diagnostics import mean_jsd
from epikern.training.drafts import build_draft, plan, train_drafts
from epikern.training.responses import read_responses
from epikern.training.target import heldout_examples, read_heldout

from .conftest import MICRO_DRAFTS, micro_drafts


@pytest.fixture(scope="module")
def trained(micro_target, tmp_path_factory):
    """DDD 2x1 and IDD 2x1 drafts (S = 1, one branch layer) of the micro target."""
    target_dir, _ = micro_target
    root = tmp_path_factory.mktemp("drafts")
    out = {}
    for name, idd in (("ddd", False), ("idd", True)):
        summary = train_drafts(micro_drafts(target_dir, idd=idd), root / name, progress=False)
        out[name] = (root / name, summary)
    return out


def test_ddd_partitions_are_disjoint_and_cover_the_prompts_idd_sees_all(trained, micro_target):
    responses = read_responses(micro_target[0] / "responses.jsonl")
    prompts = sorted({r.prompt for r in responses})
    ddd = trained["ddd"][1]["drafts"]
    assert [d["partition"] for d in ddd] == [0, 1]
    assert set(ddd[0]["prompts"]).isdisjoint(ddd[1]["prompts"])
    assert sorted(ddd[0]["prompts"] + ddd[1]["prompts"]) == list(range(len(prompts)))
    assert ddd[0]["examples"] == 2 * len(ddd[0]["prompts"])  # both responses of a prompt together
    for d in trained["idd"][1]["drafts"]:
        assert d["prompts"] == list(range(len(prompts))) and d["examples"] == len(responses)
    assert [d["seed"] for d in ddd] == [d["seed"] for d in trained["idd"][1]["drafts"]]


def test_drafts_load_as_a_draft_ensemble_with_the_targets_trunk(trained, micro_target):
    target, _ = load_causal_lm(micro_target[0])
    for name in ("ddd", "idd"):
        out, summary = trained[name]
        ens = DraftEnsemble.from_pretrained(out)
        assert (ens.num_drafts, ens.shared_layers, ens.num_layers) == (2, 1, 2)
        torch.testing.assert_close(ens.embed_tokens.weight, target.model.embed_tokens.weight, rtol=0, atol=0)
        q_weight, _ = ens.layers[0].projection("self_attn.q_proj")
        torch.testing.assert_close(q_weight[0], target.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=0)
        assert not torch.equal(ens.lm_head_weight[0], ens.lm_head_weight[1])
        for d in summary["drafts"]:
            assert d["final_loss"] < d["first_loss"]
            assert len(load_checkpoint(out / "checkpoints" / f"draft-{d['draft']}.safetensors").losses) == 24


def test_ddd_drafts_disagree_more_than_idd_drafts(trained, micro_target):
    target, tok = load_causal_lm(micro_target[0])
    examples = heldout_examples(read_heldout(micro_target[0] / "heldout.jsonl"))
    jsd = {name: mean_jsd(target, DraftEnsemble.from_pretrained(trained[name][0]), examples, pad_id=tok.pad_token_id)
           for name in ("ddd", "idd")}
    print(f"\nmean JSD on held-out target responses: DDD {jsd['ddd']:.5f} nats, IDD {jsd['idd']:.5f} nats")
    assert jsd["ddd"] > jsd["idd"] > 0, jsd


def test_build_draft_freezes_the_trunk_and_unties_the_head(micro_target):
    target, _ = load_causal_lm(micro_target[0])
    draft = build_draft(target, shared_layers=1, branch_layers=2, seed=3, jitter=0.1)
    assert draft.config.num_hidden_layers == 3 and draft.lm_head.weight is not draft.model.embed_tokens.weight
    frozen = {n for n, p in draft.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in draft.named_parameters() if n.startswith(("model.embed_tokens.", "model.layers.0."))}
    assert torch.equal(draft.model.layers[0].mlp.up_proj.weight, target.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(draft.model.layers[1].mlp.up_proj.weight, target.model.layers[1].mlp.up_proj.weight)
    again = build_draft(target, shared_layers=1, branch_layers=2, seed=3, jitter=0.1)
    assert all(torch.equal(a, b) for a, b in zip(draft.parameters(), again.parameters()))
    with pytest.raises(ValueError, match="shared_layers \\+ branch_layers <= 3 .*--shared-layers 2 and --branch-layers 2"):
        build_draft(target, shared_layers=2, branch_layers=2, seed=0, jitter=0.0)


@pytest.mark.parametrize("changes, match", [
    ({"partitions": 0}, r"partitions \(a of --ddd a×b\) must be a positive int, got 0"),
    ({"drafts_per_partition": 0}, r"drafts per partition \(b of --ddd a×b\) must be a positive int, got 0"),
    ({"partitions": 25}, "cannot cut 24 prompt\\(s\\) into 25 disjoint non-empty partitions: more partitions than prompts"),
    ({"shared_layers": 3}, "shared_layers \\+ branch_layers <= 3"),
])
def test_bad_drafts_input_is_refused_before_anything_is_written(micro_target, tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        train_drafts(micro_drafts(micro_target[0], **changes), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_draft_with_another_vocabulary_is_refused(micro_target, tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"the draft's vocabulary \(64 logits\) differs from the target's \(100\)"):
        train_drafts(micro_drafts(micro_target[0], draft_init=str(tmp_path / "other")), tmp_path / "out",
                     progress=False)
    assert not (tmp_path / "out").exists()


def test_resume_with_another_config_names_the_field_and_changes_nothing(trained, micro_target):
    out, _ = trained["ddd"]
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    recipe = micro_drafts(micro_target[0])
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, lr=1e-4))
    with pytest.raises(CheckpointError, match=r"train\.lr: 0\.003 \(checkpoint\) vs 0\.0001 \(now\)"):
        train_drafts(recipe, out, resume=True, progress=False)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_plan_seeds_and_partitions():
    p = plan(dataclasses.replace(MICRO_DRAFTS, partitions=2, drafts_per_partition=3), 10)
    assert [(e["draft"], e["partition"], e["replica"], e["seed"]) for e in p] == \
        [(k, k // 3, k % 3, MICRO_DRAFTS.train.seed + k) for k in range(6)]
    assert p[0]["prompts"] == p[2]["prompts"] != p[3]["prompts"]
