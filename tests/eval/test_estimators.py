"""eval.estimators: one interface for every method, aligned with DraftEstimator.score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epikern.eval import estimators as E
from epikern.eval.cost import draft_ensemble_flops_per_token, lm_flops_per_token
from epikern.models import DraftEnsemble, DraftEstimator, TokUR
from tests.models.helpers import drafts_sharing_trunk, tiny_model


@pytest.fixture(scope="module")
def setup():
    target = tiny_model("llama", seed=5, num_hidden_layers=2)
    drafts = DraftEnsemble.from_models(drafts_sharing_trunk(tiny_model("llama"), 3, 1), shared_layers=1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 160, (2, 9), generator=gen)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    return target, drafts, ids, mask


@torch.no_grad()
def test_baselines_match_the_target_distribution(setup):
    target, _, ids, mask = setup
    got = {e.name: e.score(ids, mask) for e in E.target_baselines(target)}
    pos = torch.arange(9).expand(2, 9) if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    log_p = torch.log_softmax(target(input_ids=ids, attention_mask=mask, position_ids=pos).logits.double(), -1)
    p = log_p.exp()
    real = mask.bool()
    torch.testing.assert_close(got["entropy"][real], (-(p * log_p).sum(-1))[real].float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["maxprob"][real], (1 - p.max(-1).values)[real].float(), atol=1e-5, rtol=1e-5)
    nll = -log_p[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got["loglik"][:, :-1][real[:, :-1]], nll[real[:, :-1]].float(), atol=1e-5, rtol=1e-5)
    assert got["loglik"][:, -1].isnan().all() and got["entropy"][1, :3].isnan().all()


@torch.no_grad()
def test_draft_and_tokur_methods_are_the_estimators_themselves(setup):
    target, drafts, ids, mask = setup
    method = E.draft_method("drafts_ddd", target, drafts)
    torch.testing.assert_close(method.score(ids, mask), DraftEstimator(target, drafts).score(ids, mask).eu,
                               equal_nan=True)
    c = 12.0
    assert method.extra_flops_per_token(c) > draft_ensemble_flops_per_token(drafts, c)
    assert method.flops_per_token(c) == pytest.approx(lm_flops_per_token(target, c) + method.extra_flops_per_token(c))
    tokur = TokUR(target, rank=4, sigma=0.1, num_samples=5)
    tm = E.tokur_method("tokur", tokur)
    torch.testing.assert_close(tm.score(ids, mask), tokur.score(ids, mask).epistemic, equal_nan=True)
    assert tm.flops_per_token(c) > 5 * lm_flops_per_token(target, c)  # M forwards + the MI op
    assert tm.is_eu and method.is_eu and not any(b.is_eu for b in E.target_baselines(target))


def test_response_scores_pick_the_positions_that_predict_each_generated_token():
    scores = torch.arange(2 * 7, dtype=torch.float32).view(2, 7)  # prompt of T0 = 3, N = 4 generated
    generated = torch.tensor([[True, True, True, True], [True, True, False, False]])
    out = E.response_scores(scores, 3, generated)
    np.testing.assert_array_equal(out[0], [2, 3, 4, 5])
    np.testing.assert_array_equal(out[1], [9, 10])


def test_length_baseline_sums_to_the_response_length(setup):
    target, _, ids, mask = setup
    method = E.length_baseline(target)
    scores = method.score(ids, mask)
    assert torch.equal(scores[mask.bool()], torch.ones(int(mask.sum()))) and scores[1, :3].isnan().all()
    generated = torch.tensor([[True, True, True, False], [True, True, False, False]])
    sums = [s.sum() for s in E.response_scores(scores, 5, generated)]
    assert sums == [3.0, 2.0] and not method.is_eu and method.extra_flops_per_token(10.0) == 0


@torch.no_grad()
def test_oracle_method_scores_the_oracle_drafts_at_k_plus_one_forwards(setup):
    from epikern.eval.oracle import OracleDrafts, oracle_method

    target, _, ids, mask = setup
    members = TokUR(target, rank=4, sigma=0.1, num_samples=5, seed=2)
    method = oracle_method("oracle_drafts", members)
    torch.testing.assert_close(method.score(ids, mask), OracleDrafts(members).score(ids, mask).eu, equal_nan=True)
    c = 12.0
    assert 4 * lm_flops_per_token(target, c) < method.extra_flops_per_token(c) < 5 * lm_flops_per_token(target, c)
    assert method.is_eu


@torch.no_grad()
def test_draft_terms_are_the_whole_draft_uncertainty_of_the_same_call(setup):
    target, drafts, ids, mask = setup
    method = E.draft_method("drafts_ddd", target, drafts)
    u = method.terms(ids, mask)
    torch.testing.assert_close(u.eu, method.score(ids, mask), equal_nan=True)
    torch.testing.assert_close(u.jsd + u.kl, u.eu, equal_nan=True, atol=1e-5, rtol=1e-5)
    assert all(m.terms is None for m in E.target_baselines(target))
