"""The speculative-decoding benchmark's pieces: early-exit drafts, a draft as an HF model, and one
tiny end-to-end measurement (structure and correctness of what it reports, never its timings)."""

from __future__ import annotations

import json

import pytest
import torch

from epikern.eval import speculative_bench as sb
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
    drafts = sb.early_exit_drafts(target, num_drafts=2, shared_layers=1, branch_layers=2)
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
        sb.early_exit_drafts(target, num_drafts=3, shared_layers=2, branch_layers=2)


def test_draft_as_hf_reproduces_each_draft(target):
    drafts = sb.early_exit_drafts(target, num_drafts=3, shared_layers=1, branch_layers=1)
    ids = torch.randint(0, target.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    for k in range(3):
        torch.testing.assert_close(hf_forward(sb.draft_as_hf(drafts, k), ids, None, None), drafts(ids)[k],
                                   atol=1e-5, rtol=1e-5)


def test_measure_reports_every_variant(target):
    drafts = sb.early_exit_drafts(target, num_drafts=2, shared_layers=1, branch_layers=2)
    prompt = torch.randint(0, target.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    out = sb.measure(target, drafts, [prompt], gammas=(2,), new_tokens=6, repeats=1, progress=False)
    names = [r["variant"] for r in out["rows"]]
    assert names == ["hf", "plain", "plain+EU", "spec", "spec+EU", "spec K=1", "spec τ=0.7", "spec+EU τ=0.7",
                     "assisted"]
    assert all(r["same_tokens"] for r in out["rows"])  # every decoder emits the target's greedy tokens
    assert all(r["tokens_per_s"] > 0 for r in out["rows"])
    spec = next(r for r in out["rows"] if r["variant"] == "spec+EU")
    assert spec["gamma"] == 2 and 1.0 <= spec["tokens_per_round"] <= 3.0 and 0.0 <= spec["acceptance"] <= 1.0
    assert set(out["eu"]) == {0, 2} and set(out["steps"]["ms"]) == {"target_1", "target_3", "draft_1", "draft_2"}
    table = sb.format_table(out)
    assert table.count("\n| spec") == 5 and "EU share" in table
    assert sb.format_table(json.loads(json.dumps(out))) == table  # a saved --json renders the same
    adaptive = next(r for r in out["rows"] if r["variant"] == "spec τ=0.7")
    assert adaptive["gamma"] == 2 and adaptive["draft_forwards"] <= spec["draft_forwards"]
    # the cost of the drafts that ran: all K (3 of 5 layers each, a shared one) or draft 0 alone
    one = next(r for r in out["rows"] if r["variant"] == "spec K=1")
    assert 0 < one["draft_flops_vs_target"] < spec["draft_flops_vs_target"] == adaptive["draft_flops_vs_target"]
    assert all(("spec7" in r) == r["variant"].startswith("spec") for r in out["rows"])
    assert "SPEC §7" in table and "rows inside" in table and "a target forward" in table


def test_spec7_verdict_reads_cost_acceptance_and_speed():
    row = {"draft_flops_vs_target": 0.4, "tokens_per_round": 3.5, "tokens_per_s": 110.0}
    assert sb.spec7_verdict(row, plain_tokens_per_s=100.0) == "met"
    assert sb.spec7_verdict(row, plain_tokens_per_s=120.0) == "not met"
    # 2.5 tokens a forward: 1.5 accepted proposals, outside the literal reading, inside the loose one
    assert sb.spec7_verdict({**row, "tokens_per_round": 2.5}, 120.0) == "outside: < 2 accepted/round"
    assert sb.spec7_verdict({**row, "tokens_per_round": 2.5}, 120.0, accepted_per_round=1) == "not met"
    assert sb.spec7_verdict({**row, "draft_flops_vs_target": 1.0}, 120.0) == "outside: drafts not cheaper"
    assert sb.plain_tokens_per_s([{"variant": "hf", "tokens_per_s": 90.0}, {"variant": "plain", "tokens_per_s": 95.0},
                                  {"variant": "spec", "tokens_per_s": 200.0}]) == 95.0


def test_the_target_as_its_own_draft_is_not_cheaper(target):
    """The self-draft runs the target's weights: FLOPs ratio 1, whatever its step's wall time."""
    drafts = sb.DraftEnsemble.from_models([target], target.config.num_hidden_layers)
    prompt = torch.randint(0, target.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    out = sb.measure(target, drafts, [prompt], gammas=(2,), new_tokens=6, repeats=1, assisted=False,
                     confidence=(0,), progress=False)
    spec = [r for r in out["rows"] if r["variant"].startswith("spec")]
    assert all(r["draft_flops_vs_target"] == pytest.approx(1.0) for r in spec)
    assert all(r["acceptance"] == 1.0 and r["spec7"] == "outside: drafts not cheaper" for r in spec)
