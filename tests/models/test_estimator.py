"""DraftEstimator: generate (greedy, sampled, eos) against score and against HF generate."""

from __future__ import annotations

import math

import pytest
import torch

import epikern as ek
from epikern.models import DraftEnsemble, DraftEstimator
from .helpers import drafts_sharing_trunk, hf_forward, tiny_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def setup():
    target = tiny_model("llama", seed=5, num_hidden_layers=3)
    drafts = DraftEnsemble.from_models(drafts_sharing_trunk(tiny_model("llama"), 3, 2), shared_layers=2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, drafts.vocab_size, (2, 6), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    return target, drafts, ids, mask


def _assert_fields_close(a, b):
    for name, x, y in zip(ek.DraftUncertainty._fields, a, b):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=1e-5, equal_nan=True, msg=name)


@pytest.mark.parametrize("proxy", [False, True])
def test_score_equals_greedy_generate_step_by_step(setup, proxy):
    target, drafts, ids, mask = setup
    reference = tiny_model("llama", seed=9, num_hidden_layers=2) if proxy else None
    est = DraftEstimator(target, drafts, reference)
    out = est.generate(ids, mask, max_new_tokens=8)
    assert out.sequences.shape == (2, 14) and out.generated_mask.all()
    assert out.uncertainty.eu.shape == (2, 8) and out.uncertainty.draft_lse.shape == (3, 2, 8)
    full_mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], dim=1)
    scored = est.score(out.sequences, full_mask)
    assert scored.eu.shape == (2, 14)
    assert scored.eu[1, :2].isnan().all() and scored.eu[0].isfinite().all()
    _assert_fields_close(out.uncertainty, type(scored)(*(f[..., 5:13] for f in scored)))
    u = out.uncertainty
    torch.testing.assert_close(u.eu, u.jsd + u.kl, atol=1e-5, rtol=1e-5)
    assert (u.jsd > 0).all() and (u.kl > 0).all()


def test_score_matches_manual_uncertainty(setup):
    target, drafts, ids, mask = setup
    scored = DraftEstimator(target, drafts).score(ids, mask)
    manual = ek.draft_uncertainty(drafts(ids, mask), hf_forward(target, ids, mask, None))
    real = mask.bool()
    for name, x, y in zip(ek.DraftUncertainty._fields, scored, manual):
        torch.testing.assert_close(x[..., real], y[..., real], atol=ATOL, rtol=1e-5, msg=name)


def test_greedy_tokens_equal_hf_generate(setup):
    target, drafts, ids, mask = setup
    out = DraftEstimator(target, drafts).generate(ids, mask, max_new_tokens=6)
    hf = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(out.sequences, hf)


def test_eos_stops_rows_and_sampling_is_seeded(setup):
    target, drafts, ids, mask = setup
    est = DraftEstimator(target, drafts)
    free = est.generate(ids, mask, max_new_tokens=6)
    eos = int(free.sequences[0, 6 + 2])
    out = est.generate(ids, mask, max_new_tokens=6, eos_token_id=eos)
    for b in range(2):
        hits = (free.sequences[b, 6:] == eos).nonzero()
        stop = int(hits[0]) if len(hits) else 6
        assert out.generated_mask[b, : stop + 1].all() and not out.generated_mask[b, stop + 1:].any()
        assert out.uncertainty.eu[b, stop + 1:].isnan().all()
        assert torch.equal(out.sequences[b, 6: 6 + stop + 1], free.sequences[b, 6: 6 + stop + 1])
    padded = est.generate(ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=7)  # the call's pad id
    live = out.generated_mask
    assert torch.equal(padded.generated_mask, live) and (~live).any()
    assert torch.equal(padded.sequences[:, 6:][live], out.sequences[:, 6:][live])
    assert (padded.sequences[:, 6:][~live] == 7).all()
    assert (out.sequences[:, 6:][~live] == eos).all()  # the target has no pad id: the eos id
    a = est.generate(ids, mask, max_new_tokens=3, do_sample=True, temperature=0.7,
                     generator=torch.Generator().manual_seed(3))
    b = est.generate(ids, mask, max_new_tokens=3, do_sample=True, temperature=0.7,
                     generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.sequences, b.sequences)
    assert ((a.sequences >= 0) & (a.sequences < drafts.vocab_size)).all()
    assert not math.isnan(float(a.uncertainty.eu.sum()))
    empty = est.generate(ids, mask, max_new_tokens=0)
    assert empty.sequences.shape == (2, 6) and empty.uncertainty.eu.shape == (2, 0)


def test_chunked_score_equals_whole_sequence(setup):
    target, drafts, ids, mask = setup
    est = DraftEstimator(target, drafts)
    whole = est.score(ids, mask)
    _assert_fields_close(est.score(ids, mask, chunk_size=4), whole)
    _assert_fields_close(est.score(ids[:1], None, chunk_size=1), est.score(ids[:1]))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        est.score(ids, mask, chunk_size=0)
