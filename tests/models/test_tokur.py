"""TokUR (design §5): σ = 0, members vs the target, MI against a float64 reference, greedy generate
against HF generate, generate against score, one batched forward per step, chunking, the ground
truth's shared bases, bad input; and the real path on SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch

import epikern as ek
from epikern.models.tokur import TokUR
from .helpers import hf_forward, tiny_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def setup():
    target = tiny_model("llama", seed=7, num_hidden_layers=3)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, target.config.vocab_size, (2, 6), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    return target, ids, mask


@pytest.fixture(scope="module")
def tokur(setup):
    return TokUR(setup[0], rank=8, sigma=0.5, num_samples=5, seed=3)


def _assert_fields_close(a, b, atol=ATOL):
    for name, x, y in zip(ek.EnsembleUncertainty._fields, a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5, equal_nan=True, msg=name)


def _mutual_information_f64(logits):
    """float64 reference: total H(p̄), aleatoric mean_m H(p_m), epistemic their difference."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    mean_logp = torch.logsumexp(logp, dim=0) - math.log(logits.shape[0])
    total = -(mean_logp.exp() * mean_logp).sum(-1)
    aleatoric = entropy.mean(0)
    return total, aleatoric, total - aleatoric


def test_sigma_zero_gives_zero_eu_and_the_clean_entropy(setup):
    target, ids, mask = setup
    u = TokUR(target, rank=4, sigma=0.0, num_samples=4).score(ids, mask)
    real = mask.bool()
    logp = torch.log_softmax(hf_forward(target, ids, mask, None).double(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1).float()
    assert u.epistemic.shape == (2, 6) and u.epistemic[~real].isnan().all()
    assert u.epistemic[real].abs().max() < 1e-5
    torch.testing.assert_close(u.total[real], entropy[real], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(u.aleatoric[real], entropy[real], atol=ATOL, rtol=1e-5)


def test_members_differ_clean_member_is_target_and_mi_matches_float64(setup, tokur):
    target, ids, mask = setup
    real = mask.bool()
    logits = tokur.perturbation(ids, mask, noise=tokur.noise(0, 6, 2))  # the members score() sees
    assert logits.shape == (5, 2, 6, target.config.vocab_size)
    torch.testing.assert_close(logits[0][real], hf_forward(target, ids, mask, None)[real], atol=ATOL, rtol=0)
    for a in range(5):
        for b in range(a + 1, 5):
            assert (logits[a] - logits[b]).abs()[real].amax(-1).min() > 1e-3, (a, b)
    u = tokur.score(ids, mask)
    for name, ours, ref in zip(ek.EnsembleUncertainty._fields, u, _mutual_information_f64(logits)):
        torch.testing.assert_close(ours[real], ref[real].float(), atol=ATOL, rtol=1e-4, msg=name)
    assert (u.epistemic[real] > 1e-4).all()
    torch.testing.assert_close(tokur.score(ids, mask).epistemic, u.epistemic, atol=0, rtol=0, equal_nan=True)


def test_greedy_generate_equals_hf_generate(setup, tokur):
    target, ids, mask = setup
    out = tokur.generate(ids, mask, max_new_tokens=6)
    hf = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(out.sequences, hf)


def test_generate_uncertainty_equals_score_and_chunked_score(setup, tokur):
    target, ids, mask = setup
    out = tokur.generate(ids, mask, max_new_tokens=8)
    assert out.sequences.shape == (2, 14) and out.generated_mask.all()
    assert out.uncertainty.epistemic.shape == (2, 8) and (out.uncertainty.epistemic > 0).all()
    full_mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], dim=1)
    scored = tokur.score(out.sequences, full_mask)
    _assert_fields_close(out.uncertainty, type(scored)(*(f[:, 5:13] for f in scored)), atol=1e-4)
    vocab = target.config.vocab_size
    for chunk in (1, 3):  # M·B·chunk·V logits per forward
        chunked = TokUR(target, num_samples=5, seed=3, perturbation=tokur.perturbation, rank=None, sigma=None,
                        max_chunk_logits=5 * 2 * chunk * vocab)
        assert chunked.chunk_size(2) == chunk
        _assert_fields_close(chunked.score(out.sequences, full_mask), scored)
        assert chunked.last_cost.forwards == math.ceil(14 / chunk) and chunked.last_cost.forwards_per_token == 5
    # scoring from the prompt's last column on: a clean prefill, then the same numbers
    for chunk_tokur in (tokur, chunked):
        late = chunk_tokur.score(out.sequences, full_mask, start=5)
        assert late.epistemic[:, :5].isnan().all()
        _assert_fields_close(type(late)(*(f[:, 5:] for f in late)), type(scored)(*(f[:, 5:] for f in scored)))
    assert chunked.last_cost.forwards == 1 + math.ceil(9 / 3) and chunked.last_cost.forwards_per_token > 5
    with pytest.raises(ValueError, match=r"start must be an int in \[0, T=14\)"):
        tokur.score(out.sequences, full_mask, start=14)


def test_members_run_as_one_batched_forward(setup, tokur):
    target, ids, mask = setup
    batches = []
    handle = target.register_forward_pre_hook(lambda mod, args, kwargs: batches.append(kwargs["input_ids"].shape),
                                              with_kwargs=True)
    try:
        tokur.score(ids, mask)
        assert batches == [(5 * 2, 6)]  # M·B rows, the whole sequence, one call
        assert tokur.last_cost == (1, 5 * 2 * 6, 2 * 6) and tokur.last_cost.forwards_per_token == 5
        batches.clear()
        tokur.generate(ids, mask, max_new_tokens=3)
        assert batches == [(2, 5)] + [(5 * 2, 1)] * 3  # clean prefill, then one M·B-row step per token
        assert tokur.last_cost == (4, 2 * 5 + 3 * 5 * 2, 2 * 3)
    finally:
        handle.remove()


def test_eos_stops_rows_and_sampling_is_seeded(setup, tokur):
    target, ids, mask = setup
    free = tokur.generate(ids, mask, max_new_tokens=6)
    eos = int(free.sequences[0, 6 + 2])
    out = tokur.generate(ids, mask, max_new_tokens=6, eos_token_id=eos)
    for b in range(2):
        hits = (free.sequences[b, 6:] == eos).nonzero()
        stop = int(hits[0]) if len(hits) else 6
        assert out.generated_mask[b, : stop + 1].all() and not out.generated_mask[b, stop + 1:].any()
        assert out.uncertainty.epistemic[b, stop + 1:].isnan().all()
        assert out.uncertainty.epistemic[b, : stop + 1].isfinite().all()
        assert torch.equal(out.sequences[b, 6: 6 + stop + 1], free.sequences[b, 6: 6 + stop + 1])
    a, b = (tokur.generate(ids, mask, max_new_tokens=3, do_sample=True, temperature=0.7,
                           generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.uncertainty.total, b.uncertainty.total)
    empty = tokur.generate(ids, mask, max_new_tokens=0)
    assert empty.sequences.shape == (2, 6) and empty.uncertainty.epistemic.shape == (2, 0)


def test_ground_truth_shares_the_bases_with_its_own_noise(setup, tokur):
    target, ids, mask = setup
    truth = tokur.with_samples(32, seed=1)
    assert truth.perturbation is tokur.perturbation and truth.num_samples == 32
    assert truth.noise(0, 6, 2).shape == (3, 2, 31, 2, 6, 8)
    assert not torch.equal(truth.noise(0, 6, 2)[:, :, :4], tokur.noise(0, 6, 2))
    real = mask.bool()
    u, ref = truth.score(ids, mask), tokur.score(ids, mask)
    assert truth.last_cost.token_rows == 32 * 2 * 6
    assert (u.epistemic[real] > 0).all() and not torch.allclose(u.epistemic[real], ref.epistemic[real])


def test_bad_input_is_named(setup, tokur):
    target, ids, mask = setup
    with pytest.raises(ValueError, match="num_samples must be an int >= 2.*got 1"):
        TokUR(target, num_samples=1)
    with pytest.raises(ValueError, match="rank must be an int >= 1, got 0"):
        TokUR(target, rank=0)
    with pytest.raises(ValueError, match=r"rank=25 exceeds min\(out, in\) = 24"):
        TokUR(target, rank=25)
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0, got -1"):
        TokUR(target, sigma=-1)
    with pytest.raises(ValueError, match="rank=4, sigma=0.1 disagree"):
        TokUR(target, rank=4, perturbation=tokur.perturbation)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        tokur.generate(ids, mask, max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature must be > 0 when sampling, got 0"):
        tokur.generate(ids, mask, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, past \+ T\] = \[2, 6\]"):
        tokur.score(ids, mask[:, 1:])


@pytest.fixture(scope="module")
def smollm2_tokur(smollm2):
    model, tokenizer = smollm2
    return TokUR(model, rank=8, sigma=0.1, num_samples=4, seed=0), tokenizer


def test_smollm2_members_differ_and_eu_is_positive(smollm2_tokur):
    tokur, tokenizer = smollm2_tokur
    model = tokur.target
    question = "Tom has 3 apples and buys 4 more. How many does he have? 3 + 4 ="
    ids = tokenizer(question, return_tensors="pt").input_ids
    logits = tokur.perturbation.member_logits(ids, num_members=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits[0], hf_forward(model, ids, None, None), atol=1e-4, rtol=0)
    assert (logits[1] - logits[0]).abs().amax(-1).min() > 1e-3 and (logits[2] - logits[1]).abs().amax(-1).min() > 1e-3
    out = tokur.generate(ids, max_new_tokens=3)
    hf = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    assert torch.equal(out.sequences, hf)
    u = out.uncertainty  # (generate == score is tested on the tiny model)
    assert u.epistemic.shape == (1, 3) and (u.epistemic > 0).all() and (u.epistemic < u.total).all()
