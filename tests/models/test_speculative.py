"""Speculative decoding in DraftEstimator.generate (design §4b): greedy against HF generate and γ = 0,
exact sampling (chi-square goodness of fit against the target's own law), acceptance, bad input, and
the real path on SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import epikern as ek
from epikern.eval.speculative_models import early_exit_drafts
from epikern.models import DraftEnsemble, DraftEstimator
from epikern.models.decoding import DecodingStats
from .helpers import (TEMPERATURE, V_SMALL, chi_square_pvalue, one_thread, sequence_index,  # noqa: F401
                      small_vocab_laws, tiny_model)

EU_ATOL = 1e-4
COMBOS = [(1, 0), (1, 2), (4, 0), (4, 2)]  # (K, S)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    """A 3-layer target, drafts cloned from it with small noise (so they accept some proposals and
    reject others), a proxy, and left-padded prompts."""
    target = tiny_model("llama", seed=5, num_hidden_layers=3)
    drafts = {(K, S): DraftEnsemble.from_base(target, K, S, seed=1, jitter=0.05) for K, S in COMBOS}
    proxy = tiny_model("llama", seed=9, num_hidden_layers=2)
    ids = torch.randint(0, target.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return target, drafts, proxy, ids, mask


def _batch(tiny, batch):
    _, _, _, ids, mask = tiny
    return ids[:batch], mask[:batch]


def _eos(tiny, batch):
    """An eos id that the target emits in the middle of row 0's greedy output (other rows may stop
    elsewhere or never)."""
    target = tiny[0]
    ids, mask = _batch(tiny, batch)
    free = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    return int(free[0, ids.shape[1] + 5])


def _hf_greedy(target, ids, mask, new_tokens, eos):
    return target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=eos if eos is not None else 0, eos_token_id=eos)


def _assert_uncertainty_close(a, b):
    for name, x, y in zip(ek.DraftUncertainty._fields, a, b):
        torch.testing.assert_close(x, y, atol=EU_ATOL, rtol=1e-4, equal_nan=True, msg=name)


@pytest.mark.parametrize("with_eos", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("K,S", COMBOS)
def test_greedy_equals_hf_generate_and_plain_decoding(tiny, K, S, batch, with_eos):
    target, drafts, _, _, _ = tiny
    ids, mask = _batch(tiny, batch)
    eos = _eos(tiny, batch) if with_eos else None
    est = DraftEstimator(target, drafts[K, S])
    hf = _hf_greedy(target, ids, mask, 16, eos)
    plain = est.generate(ids, mask, max_new_tokens=16, eos_token_id=eos)
    assert torch.equal(plain.sequences, hf)
    for gamma in (1, 3, 5):
        out = est.generate(ids, mask, max_new_tokens=16, eos_token_id=eos, speculative_tokens=gamma)
        assert torch.equal(out.sequences, hf), f"γ={gamma}"
        assert torch.equal(out.generated_mask, plain.generated_mask)
        _assert_uncertainty_close(out.uncertainty, plain.uncertainty)
        st = out.stats
        assert st.target_forwards == st.rounds < plain.stats.rounds
        assert sum(st.accepted) + st.rounds == out.generated_mask.shape[1]  # every round emits accepted + 1
        assert all(0 <= a <= p <= gamma for a, p in zip(st.accepted, st.proposed))
        assert sum(st.accepted) > 0  # the acceptance path ran (and, for most cases, rejections too)
        if with_eos:
            assert not out.generated_mask[0, 6:].any()  # row 0 stopped at its eos (position 5)


@pytest.mark.parametrize("with_eos", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_confidence_stop_keeps_greedy_output_and_uncertainty(tiny, batch, with_eos):
    """Adaptive rounds: a round stops proposing after a doubted proposal (q(y) < τ), the output and
    the EU stay plain decoding's, and the drafts take fewer steps than with γ proposals a round."""
    target, drafts, proxy, _, _ = tiny
    ids, mask = _batch(tiny, batch)
    eos = _eos(tiny, batch) if with_eos else None
    est = DraftEstimator(target, drafts[4, 2], proxy)
    plain = est.generate(ids, mask, max_new_tokens=16, eos_token_id=eos)
    fixed = est.generate(ids, mask, max_new_tokens=16, eos_token_id=eos, speculative_tokens=5)
    for tau in (0.5, 0.9, 1.0):
        out = est.generate(ids, mask, max_new_tokens=16, eos_token_id=eos, speculative_tokens=5,
                           confidence_threshold=tau)
        assert torch.equal(out.sequences, plain.sequences), f"τ={tau}"
        assert torch.equal(out.generated_mask, plain.generated_mask)
        _assert_uncertainty_close(out.uncertainty, plain.uncertainty)
        st = out.stats
        assert all(0 <= a <= p <= 5 for a, p in zip(st.accepted, st.proposed))
        assert sum(st.accepted) + st.rounds == out.generated_mask.shape[1]
        assert st.reference_forwards == st.target_forwards == st.rounds
        assert st.draft_forwards < fixed.stats.draft_forwards
        assert min(st.proposed[:-1]) < 5 if tau < 1 else set(st.proposed) <= {0, 1}  # q(y) < 1 always stops


def test_greedy_sliding_window_target_and_single_draft_proposal(tiny):
    """Rollback past a Mistral sliding window (the target's cache records its past while speculating),
    and proposals from one draft of the ensemble."""
    _, _, _, ids, mask = tiny
    target = tiny_model("mistral", seed=4)
    ids = ids % target.config.vocab_size
    drafts = DraftEnsemble.from_base(target, 3, 1, seed=2, jitter=0.05)
    est = DraftEstimator(target, drafts)
    hf = _hf_greedy(target, ids, mask, 20, None)
    for proposal in ("mixture", 2):
        out = est.generate(ids, mask, max_new_tokens=20, speculative_tokens=3, proposal=proposal)
        assert torch.equal(out.sequences, hf), proposal
        assert sum(out.stats.accepted) > 0


def test_padded_draft_vocabulary(tiny):
    """Drafts with a longer (padded) vocabulary than the target propose only the tokens they share."""
    target, _, _, ids, mask = tiny
    base = tiny_model("llama", seed=5, num_hidden_layers=3, vocab_size=176)
    est = DraftEstimator(target, DraftEnsemble.from_base(base, 2, 1, seed=3, jitter=0.05))
    hf = _hf_greedy(target, ids, mask, 12, None)
    assert torch.equal(est.generate(ids, mask, max_new_tokens=12, speculative_tokens=2).sequences, hf)
    out = est.generate(ids, mask, max_new_tokens=12, speculative_tokens=2, do_sample=True,
                       generator=torch.Generator().manual_seed(0))
    assert (out.sequences < target.config.vocab_size).all() and out.uncertainty.eu.isfinite().all()


@pytest.mark.parametrize("with_eos", [False, True])
@pytest.mark.parametrize("do_sample", [False, True])
def test_uncertainty_with_proxy_equals_teacher_forced_score(tiny, do_sample, with_eos):
    """With an OSD-style proxy as reference: speculative EU equals plain decoding's (greedy) and, for
    sampled text, the teacher-forced score of the emitted sequence; the proxy runs once per round;
    after a row's eos come pad tokens with NaN uncertainty."""
    target, drafts, proxy, ids, mask = tiny
    est = DraftEstimator(target, drafts[4, 2], proxy, weights=[0.4, 0.3, 0.2, 0.1])
    eos = list(range(0, target.config.vocab_size, 5)) if with_eos else None  # rows stop early, at different times
    kw = dict(max_new_tokens=12, do_sample=do_sample, temperature=0.9, eos_token_id=eos)
    out = est.generate(ids, mask, speculative_tokens=3, generator=torch.Generator().manual_seed(7), **kw)
    assert out.stats.reference_forwards == out.stats.rounds
    N = out.generated_mask.shape[1]
    scored = est.score(out.sequences, torch.cat([mask, torch.ones(3, N, dtype=torch.long)], dim=1))
    expected = type(scored)(*(f[..., 5:5 + N].masked_fill(~out.generated_mask, float("nan")) for f in scored))
    _assert_uncertainty_close(out.uncertainty, expected)
    if with_eos:
        assert not out.generated_mask.all() and out.generated_mask[:, 0].all()
        for row, live in zip(out.sequences[:, 6:], out.generated_mask):
            stop = int(live.sum())  # the eos, if the row emitted one, is its last live token
            assert live[:stop].all() and not any(int(t) in eos for t in row[:stop - 1])
            assert stop == N or (int(row[stop - 1]) in eos and (row[stop:] == eos[0]).all())
    if not do_sample:
        _assert_uncertainty_close(out.uncertainty, est.generate(ids, mask, **kw).uncertainty)
    again = est.generate(ids, mask, speculative_tokens=3, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(again.sequences, out.sequences)  # seeded sampling is reproducible


def test_drafts_identical_to_target_accept_every_proposal(tiny):
    target, _, _, ids, mask = tiny
    est = DraftEstimator(target, DraftEnsemble.from_models([target] * 4, shared_layers=2))
    for do_sample in (False, True):
        out = est.generate(ids, mask, max_new_tokens=16, speculative_tokens=4, do_sample=do_sample,
                           generator=torch.Generator().manual_seed(0))
        # 5 + 5 + 5 tokens, then 1 within max_new_tokens = 16
        assert out.stats.accepted == out.stats.proposed == (4, 4, 4, 0)
        assert out.stats.acceptance_rate == 1.0 and out.stats.tokens_per_round == 4.0
        # γ draft steps a round: a fully accepted round's bonus token is scored by the next round's
        # first draft step (which consumes the last proposal and the bonus token together)
        assert out.stats.draft_forwards == 4 + 4 + 4 + 1
        torch.testing.assert_close(out.uncertainty.eu, torch.zeros(3, 16), atol=1e-5, rtol=0)


def test_without_uncertainty_and_short_budgets(tiny):
    target, drafts, proxy, ids, mask = tiny
    est = DraftEstimator(target, drafts[4, 2], proxy)
    ref = est.generate(ids, mask, max_new_tokens=7, speculative_tokens=5)
    off = est.generate(ids, mask, max_new_tokens=7, speculative_tokens=5, with_uncertainty=False)
    assert off.uncertainty is None and torch.equal(off.sequences, ref.sequences)
    assert off.stats.reference_forwards == 0 and off.stats.draft_forwards <= ref.stats.draft_forwards
    plain = est.generate(ids, mask, max_new_tokens=7, with_uncertainty=False)
    assert plain.stats.draft_forwards == 0 and torch.equal(plain.sequences, ref.sequences)
    one = est.generate(ids, mask, max_new_tokens=1, speculative_tokens=5)
    assert one.stats.proposed == (0,) and torch.equal(one.sequences, ref.sequences[:, :7])
    assert sum(ref.stats.accepted) + ref.stats.rounds == 7 and max(ref.stats.proposed) <= 5
    empty = est.generate(ids, mask, max_new_tokens=0, speculative_tokens=2)
    assert empty.sequences.shape == (3, 6) and empty.uncertainty.eu.shape == (3, 0) and empty.stats.rounds == 0
    plain_stats = est.generate(ids, mask, max_new_tokens=3).stats
    assert plain_stats.rounds == 3 and plain_stats.accepted == (0, 0, 0)
    assert np.isnan(plain_stats.acceptance_rate) and plain_stats.tokens_per_round == 1.0
    assert isinstance(plain_stats, DecodingStats) and plain_stats.as_dict()["rounds"] == 3


def test_bad_input(tiny):
    target, drafts, _, ids, mask = tiny
    est = DraftEstimator(target, drafts[4, 2])
    with pytest.raises(ValueError, match="speculative_tokens must be >= 0, got -1"):
        est.generate(ids, mask, speculative_tokens=-1)
    with pytest.raises(TypeError, match="speculative_tokens must be an int, got float"):
        est.generate(ids, mask, speculative_tokens=2.0)
    for bad in (4, -1, True, "mean"):
        with pytest.raises(ValueError, match=r"proposal must be 'mixture' or a draft index in \[0, 4\)"):
            est.generate(ids, mask, speculative_tokens=2, proposal=bad)
    for tau in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"confidence_threshold must be in \[0, 1\], got"):
            est.generate(ids, mask, speculative_tokens=2, confidence_threshold=tau)
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0 when sampling"):
            est.generate(ids, mask, speculative_tokens=2, do_sample=True, temperature=temperature)
    other = tiny_model("llama", seed=9, num_hidden_layers=1, vocab_size=128)
    with pytest.raises(ValueError, match="vocabulary of 128 logits but the target has 160"):
        DraftEstimator(target, drafts[4, 2], other)


# -------------------------------------------------------------------------------------------------
# exact sampling: the emitted tokens follow the target's law


@pytest.fixture(scope="module")
def small_vocab():
    """Target and K = 2 drafts over 8 tokens (:func:`small_vocab_laws`) with mixture weights 0.7, 0.3."""
    weights = torch.tensor([0.7, 0.3])
    case = small_vocab_laws(weights)
    return DraftEstimator(case.target, case.drafts, weights=weights), case.prompt, case.p, case.q


@pytest.mark.parametrize("tau", [0.0, 0.3])
def test_sampling_follows_the_target_law_one_row(small_vocab, tau):
    """Batch 1, γ = 2, three tokens, 600 seeded runs: the first token, a token after an accepted
    proposal, the residual after a rejection and the bonus token all occur, and the joint law of the
    three tokens is the target's (and clearly not the drafts'); with a confidence stop (τ) too,
    where a first round stopped after one proposal both accepts it (then a bonus token) and rejects it."""
    est, prompt, p, q = small_vocab
    counts, paths = np.zeros(V_SMALL ** 3), set()
    for seed in range(600):
        out = est.generate(prompt, max_new_tokens=3, do_sample=True, temperature=TEMPERATURE, speculative_tokens=2,
                           confidence_threshold=tau, generator=torch.Generator().manual_seed(seed),
                           with_uncertainty=False)
        counts[sequence_index(out.sequences[:, 3:])] += 1
        paths.add((out.stats.proposed[0], out.stats.accepted))
    cuts = {accepted for _, accepted in paths}
    assert {(0, 0, 0), (0, 1), (1, 0), (2,)} <= cuts  # every path of a full round was taken
    stopped = {accepted[0] for proposed, accepted in paths if proposed == 1}
    assert stopped == (set() if tau == 0 else {0, 1})
    assert chi_square_pvalue(counts, p) > 1e-3
    assert chi_square_pvalue(counts, q) < 1e-9
    assert chi_square_pvalue(counts.reshape(V_SMALL, -1).sum(1), p.reshape(V_SMALL, -1).sum(1)) > 1e-3  # x1 alone


@pytest.mark.parametrize("tau", [0.0, 0.3])
def test_sampling_follows_the_target_law_batch(small_vocab, tau):
    """2000 rows in one call: rows cut short by other rows' rejections (or confidence) still follow
    the target's law."""
    est, prompt, p, q = small_vocab
    out = est.generate(prompt.expand(2000, -1), max_new_tokens=3, do_sample=True, temperature=TEMPERATURE,
                       speculative_tokens=2, confidence_threshold=tau, generator=torch.Generator().manual_seed(11))
    counts = np.bincount(sequence_index(out.sequences[:, 3:]), minlength=V_SMALL ** 3)
    assert chi_square_pvalue(counts, p) > 1e-3
    assert chi_square_pvalue(counts, q) < 1e-9
    assert out.uncertainty.eu.isfinite().all()


# -------------------------------------------------------------------------------------------------
# the real path: SmolLM2 as the target


def test_smollm2_greedy_text_equals_generate(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "Tom has 3 boxes with 12 apples each. He eats 5 apples. How many "
                                             "apples are left?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    T0 = ids.shape[1]
    hf = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                        eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    # early-exit drafts (embedding + 4 shared layers + 2 of the last layers each): cheap, rarely right
    cheap = DraftEstimator(model, early_exit_drafts(model, num_drafts=2, shared_layers=4, branch_layers=2))
    out = cheap.generate(ids, max_new_tokens=32, speculative_tokens=3)
    assert torch.equal(out.sequences, hf)
    assert tokenizer.decode(out.sequences[0, T0:]) == tokenizer.decode(hf[0, T0:])
    scored = cheap.score(hf[:, :-1])  # teacher forcing = plain decoding's EU (test_estimator)
    _assert_uncertainty_close(out.uncertainty, type(scored)(*(f[..., T0 - 1:] for f in scored)))
    adaptive = cheap.generate(ids, max_new_tokens=32, speculative_tokens=4, confidence_threshold=0.5)
    assert torch.equal(adaptive.sequences, hf)
    assert min(adaptive.stats.proposed[:-1]) < 4 and adaptive.stats.draft_forwards < out.stats.draft_forwards
    _assert_uncertainty_close(adaptive.uncertainty, out.uncertainty)
    # the target itself as one draft: every proposal is right and EU is 0
    exact = DraftEstimator(model, DraftEnsemble.from_models([model], shared_layers=model.config.num_hidden_layers))
    out = exact.generate(ids, max_new_tokens=32, speculative_tokens=4)
    assert torch.equal(out.sequences, hf)
    assert out.stats.acceptance_rate > 0.9
    torch.testing.assert_close(out.uncertainty.eu, torch.zeros(1, 32), atol=1e-4, rtol=0)
