"""The speculative-decoding benchmark's pieces: early-exit drafts, a draft as an HF model, and one
tiny end-to-end measurement (structure and correctness of what it reports, never its timings)."""

from __future__ import annotations

import json

import pytest
import torch

from epikern.eval import speculative_bench as sb
from epikern.eval import speculative_models as sm
from epikern.eval.speculative_measure import Rounds, SpeculativeResult, Variant, VariantRow, measure
from epikern.eval.speculative_verdict import plain_tokens_per_s, spec7_verdict
from tests.models.helpers import hf_forward, tiny_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", seed=2, num_hidden_layers=5)


def test_early_exit_drafts_are_the_targets_own_layers(target):
    drafts = sm.early_exit_drafts(target, num_drafts=2, shared_layers=1, branch_layers=2)
    assert (drafts.num_drafts, drafts.shared_layers, drafts.num_layers) == (2, 1, 3)
    ids = torch.randint(0, target.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    logits = drafts(ids)
    dec = target.get_decoder()
    for k, layers in enumerate(([0, 3, 4], [0, 2, 3])):  # trunk layer 0, then the window ending k layers early
        h = dec.embed_tokens(ids)
        pos = torch.arange(7)[None].expand(2, 7)
        cos_sin = dec.rotary_emb(h, pos)
        for l in layers:
            h = dec.layers[l](h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
            h = h[0] if isinstance(h, tuple) else h
        expected = target.get_output_embeddings()(dec.norm(h))
        torch.testing.assert_close(logits[k], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit in 5 layers"):
        sm.early_exit_drafts(target, num_drafts=3, shared_layers=2, branch_layers=2)


def test_draft_as_hf_reproduces_each_draft(target):
    drafts = sm.early_exit_drafts(target, num_drafts=3, shared_layers=1, branch_layers=1)
    ids = torch.randint(0, target.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    for k in range(3):
        torch.testing.assert_close(hf_forward(sm.draft_as_hf(drafts, k), ids, None, None), drafts(ids)[k],
                                   atol=1e-5, rtol=1e-5)


def test_measure_reports_every_variant(target):
    drafts = sm.early_exit_drafts(target, num_drafts=2, shared_layers=1, branch_layers=2)
    prompt = torch.randint(0, target.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    out = measure(target, drafts, [prompt], gammas=(2,), new_tokens=6, repeats=1, progress=False)
    names = [r.variant.name for r in out.rows]
    assert names == ["hf", "plain", "plain+EU", "spec γ=2", "spec+EU γ=2", "spec K=1 γ=2", "spec τ=0.7 γ=2",
                     "spec+EU τ=0.7 γ=2", "assisted γ=2"]
    assert all(r.same_tokens for r in out.rows)  # every decoder emits the target's greedy tokens
    assert all(r.tokens_per_s > 0 for r in out.rows)
    spec = out.row(Variant("spec", 2, eu=True))
    assert 1.0 <= spec.tokens_per_round <= 3.0 and 0.0 <= spec.rounds.acceptance <= 1.0
    assert set(out.eu) == {0, 2} and set(out.steps.ms) == {"target_1", "target_3", "draft_1", "draft_2"}
    table = sb.markdown(out)
    assert table.count("\n| spec") == 5 and "EU share" in table
    saved = json.loads(json.dumps(out.to_json(), allow_nan=False))
    assert SpeculativeResult.from_json(saved) == out and sb.markdown(SpeculativeResult.from_json(saved)) == table
    adaptive = out.row(Variant("spec", 2, confidence=0.7))
    assert adaptive.rounds.draft_forwards <= spec.rounds.draft_forwards
    # the cost of the drafts that ran: all K (3 of 5 layers each, a shared one) or draft 0 alone
    one = out.row(Variant("spec", 2, single_draft=True))
    assert 0 < one.draft_flops_vs_target < spec.draft_flops_vs_target == adaptive.draft_flops_vs_target
    assert all((r.spec7 is not None) == (r.variant.kind == "spec") for r in out.rows)
    assert "design §7" in table and "rows inside" in table and "a target forward" in table


def test_variant_names_and_checks():
    assert Variant("spec", 4, eu=True, confidence=0.7).name == "spec+EU τ=0.7 γ=4"
    assert Variant("spec", 1, single_draft=True).label == "spec K=1" and Variant("plain", eu=True).name == "plain+EU"
    with pytest.raises(ValueError, match="kind"):
        Variant("beam")
    with pytest.raises(ValueError, match="γ > 0"):
        Variant("plain", 2)


def _row(kind="spec", gamma=2, eu=False, flops=0.4, tokens_per_round=3.5, tokens_per_s=110.0):
    rounds = Rounds(0.5, tokens_per_round, 10, 20, 1.0) if kind != "hf" else None
    return VariantRow(Variant(kind, gamma, eu), tokens_per_s, 1.0, 1.0, True, rounds, flops)


def test_spec7_verdict_reads_cost_acceptance_and_speed():
    row = _row()
    assert spec7_verdict(row, plain_tokens_per_s=100.0) == "met"
    assert spec7_verdict(row, plain_tokens_per_s=120.0) == "not met"
    # 2.5 tokens a forward: 1.5 accepted proposals, outside the literal reading, inside the loose one
    assert spec7_verdict(_row(tokens_per_round=2.5), 120.0) == "outside: < 2 accepted/round"
    assert spec7_verdict(_row(tokens_per_round=2.5), 120.0, accepted_per_round=1) == "not met"
    assert spec7_verdict(_row(flops=1.0), 120.0) == "outside: drafts not cheaper"
    rows = [_row("hf", 0, tokens_per_s=90.0), _row("plain", 0, tokens_per_s=95.0),
            _row("plain", 0, eu=True, tokens_per_s=99.0), _row(tokens_per_s=200.0)]
    assert plain_tokens_per_s(rows) == 95.0


def test_the_target_as_its_own_draft_is_not_cheaper(target):
    """The self-draft runs the target's weights: FLOPs ratio 1, whatever its step's wall time."""
    drafts = sm.DraftEnsemble.from_models([target], target.config.num_hidden_layers)
    prompt = torch.randint(0, target.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    out = measure(target, drafts, [prompt], gammas=(2,), new_tokens=6, repeats=1, assisted=False,
                  confidence=(0,), progress=False)
    spec = [r for r in out.rows if r.variant.kind == "spec"]
    assert all(r.draft_flops_vs_target == pytest.approx(1.0) for r in spec)
    assert all(r.rounds.acceptance == 1.0 and r.spec7 == "outside: drafts not cheaper" for r in spec)
