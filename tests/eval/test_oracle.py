"""Oracle drafts: TokUR's own perturbed members scored as drafts against the clean target.

Against a float64 reference of the same members, the same members as TokUR's estimator, and the
second-order relation between the two scores (see epikern.eval.oracle)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from epikern.eval.oracle import OracleDrafts
from epikern.models.tokur import TokUR
from tests.models.helpers import tiny_model


@pytest.fixture(scope="module")
def setup():
    target = tiny_model("llama", seed=7, num_hidden_layers=3)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, target.config.vocab_size, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :3] = 0
    return target, ids, mask


def _members_f64(members: TokUR, ids, mask):
    noise = members.noise(0, ids.shape[1], ids.shape[0])
    logits = members.perturbation.member_logits(ids, mask, num_members=members.num_samples, noise=noise)
    return torch.log_softmax(logits.double(), dim=-1)  # [M, B, T, V], member 0 clean


def _entropy(logp):
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def test_oracle_fields_match_a_float64_reference_of_the_same_members(setup):
    target, ids, mask = setup
    members = TokUR(target, rank=8, sigma=0.5, num_samples=5, seed=11)
    u = OracleDrafts(members).score(ids, mask)
    logp = _members_f64(members, ids, mask)
    clean, drafts = logp[0], logp[1:]
    eu = (drafts.exp() * (drafts - clean)).sum(-1).mean(0)
    mixture = torch.logsumexp(drafts, dim=0) - math.log(drafts.shape[0])
    jsd = _entropy(mixture) - _entropy(drafts).mean(0)
    kl = (mixture.exp() * (mixture - clean)).sum(-1)
    keep = mask.bool()
    for name, got, want in (("eu", u.eu, eu), ("jsd", u.jsd, jsd), ("kl", u.kl, kl)):
        torch.testing.assert_close(got[keep].double(), want[keep], atol=2e-5, rtol=1e-4, msg=name)
        assert got[~keep].isnan().all(), name
    torch.testing.assert_close(u.eu, u.jsd + u.kl, atol=2e-5, rtol=1e-4, equal_nan=True)
    assert (u.kl[keep] > 0).all() and (u.jsd[keep] > 0).all()
    # member 0 is the clean target: the reference of the oracle
    plain = torch.log_softmax(target(input_ids=ids[:1]).logits.double(), dim=-1)
    torch.testing.assert_close(clean[:1], plain, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_the_oracle_runs_tokurs_members_and_groups_rows_without_changing_them(setup):
    target, ids, mask = setup
    members = TokUR(target, rank=8, sigma=0.5, num_samples=5, seed=11)
    logp = _members_f64(members, ids, mask)
    mixture = torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])
    mi = _entropy(mixture) - _entropy(logp).mean(0)  # TokUR's estimator over the same 5 members
    keep = mask.bool()
    torch.testing.assert_close(members.score(ids, mask).epistemic[keep].double(), mi[keep], atol=2e-5, rtol=1e-4)
    whole = OracleDrafts(members).score(ids, mask)
    V = target.config.vocab_size
    one_row = OracleDrafts(TokUR(target, None, None, 5, seed=11, max_chunk_logits=5 * 12 * V,
                                 perturbation=members.perturbation)).score(ids, mask)
    for name, a, b in zip(whole._fields, whole, one_row):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, equal_nan=True, msg=name)
    assert whole.draft_lse.shape == (4, 3, 12)


@torch.no_grad()
def test_oracle_eu_is_within_tolerance_of_tokurs_estimator_with_the_same_members(setup):
    """Small σ: TokUR's MI over the clean model and the K members ≈ (K / (K + 1))² · the oracle's eu
    (to second order in σ), token by token up to the members' sampling noise."""
    target = setup[0]
    ids = torch.randint(0, target.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(2))
    K = 9
    members = TokUR(target, rank=8, sigma=0.02, num_samples=K + 1, seed=5)
    oracle = OracleDrafts(members).score(ids).eu.flatten().double().numpy()
    tokur = members.score(ids).epistemic.flatten().double().numpy()
    ratio, pearson = tokur.mean() / oracle.mean(), np.corrcoef(tokur, oracle)[0, 1]
    print(f"\nTokUR MI / oracle eu = {ratio:.3f} (second order: {(K / (K + 1)) ** 2:.3f}), Pearson {pearson:.4f}")
    assert abs(ratio / (K / (K + 1)) ** 2 - 1) < 0.08
    assert pearson > 0.98


def test_bad_members_are_refused(setup):
    with pytest.raises(TypeError, match="TokUR"):
        OracleDrafts(setup[0])
