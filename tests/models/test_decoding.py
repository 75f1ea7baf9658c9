"""The decoding core's primitives one by one: setup (prepare, Sampler), the eos rule, the transcript,
the proposal rule, accept/reject on hand-made logits, and one round's propose → verify → rollback on
tiny models (cache lengths after the crop, and the next round's tokens equal a fresh decode)."""

from __future__ import annotations

import pytest
import torch

from epikern.models import DraftEnsemble
from epikern.models.decoding import (DraftDecoder, Emitted, Proposal, Proposer, Sampler, Transcript,
                                     accept, prepare, stop_at_eos)
from epikern.ops import EnsembleUncertainty
from .helpers import tiny_model

NAN = float("nan")


class _Config:
    def __init__(self, pad_token_id):
        self.pad_token_id = pad_token_id


def test_prepare_checks_and_resolves_pad():
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    batch = prepare(ids, None, 4, [9, 2], None, _Config(None))
    assert torch.equal(batch.mask, torch.ones(2, 3, dtype=torch.long)) and not batch.has_padding
    assert batch.eos.tolist() == [9, 2] and batch.pad == 9  # no pad id: the first eos id
    padded = prepare(ids, torch.tensor([[0, 1, 1], [1, 1, 1]]), 4, 9, None, _Config(0))
    assert padded.pad == 0 and padded.has_padding and padded.mask is padded.attention_mask
    assert prepare(ids, None, 0, None, None, _Config(None)).eos is None
    assert prepare(ids, None, 4, 9, 5, _Config(0)).pad == 5  # the call's pad id first
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        prepare(ids, None, -1, None, None, _Config(None))
    for bad in (ids[0], ids[:, :0]):
        with pytest.raises(ValueError, match=r"input_ids must be \[B, T0\] with T0 >= 1"):
            prepare(bad, None, 4, None, None, _Config(None))


def test_sampler_picks_argmax_or_the_seeded_sample():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Sampler().pick(logits), logits.argmax(-1))
    sampler = Sampler(True, 0.7, torch.Generator().manual_seed(3))
    expected = torch.multinomial(torch.softmax(logits / 0.7, -1), 1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampler.pick(logits), expected.squeeze(1))
    for temperature in (0.0, -1.0, NAN):
        with pytest.raises(ValueError, match="temperature must be > 0 when sampling"):
            Sampler(True, temperature)
    Sampler(False, 0.0)  # greedy ignores the temperature


def test_stop_at_eos_pads_after_the_first_eos_and_drops_dead_columns():
    new = torch.tensor([[5, 9, 3], [9, 4, 4], [1, 2, 3]])
    out = stop_at_eos(new, torch.tensor([False, False, True]), torch.tensor([9]), 0)
    assert out.tokens.tolist() == [[5, 9], [9, 0], [0, 0]]  # the third column is after every eos
    assert out.alive.tolist() == [[True, True], [True, False], [False, False]]
    assert out.finished.tolist() == [True, True, True] and out.done
    some = stop_at_eos(new, torch.zeros(3, dtype=torch.bool), torch.tensor([4, 7]), 0)
    assert some.tokens.tolist() == [[5, 9, 3], [9, 4, 0], [1, 2, 3]] and not some.done
    assert some.finished.tolist() == [False, True, False]
    free = stop_at_eos(new, torch.zeros(3, dtype=torch.bool), None, None)
    assert free.tokens is new and free.alive.all() and not free.done


def test_transcript_joins_rounds_and_sets_nan_after_eos():
    ids = torch.tensor([[1, 2], [3, 4]])
    transcript = Transcript()
    one = torch.tensor([[0.5], [0.25]])
    transcript.add(Emitted(torch.tensor([[7], [8]]), torch.ones(2, 1, dtype=torch.bool), torch.tensor([False, True]),
                           False), EnsembleUncertainty(one, one, one))
    two = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    transcript.add(Emitted(torch.tensor([[5, 6], [0, 0]]), torch.tensor([[True, True], [False, False]]),
                           torch.tensor([False, True]), False), EnsembleUncertainty(two, two, two))
    sequences, generated, u = transcript.finish(ids, None)
    assert sequences.tolist() == [[1, 2, 7, 5, 6], [3, 4, 8, 0, 0]]
    assert generated.tolist() == [[True] * 3, [True, False, False]]
    torch.testing.assert_close(u.epistemic, torch.tensor([[0.5, 1.0, 2.0], [0.25, NAN, NAN]]), equal_nan=True)
    empty = EnsembleUncertainty(*[torch.empty(2, 0)] * 3)
    sequences, generated, u = Transcript().finish(ids, empty)
    assert sequences is ids and generated.shape == (2, 0) and generated.dtype == torch.bool and u is empty


def test_proposer_rule_and_checks():
    logits = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(1))  # [K, B, V]
    weights = torch.tensor([0.25, 0.75])
    mixture = Proposer(3, None, weights, 8, Sampler(True, 0.5))
    expected = (weights[:, None, None] * torch.softmax(logits[..., :8] / 0.5, -1)).sum(0)
    torch.testing.assert_close(mixture.probs(logits), expected)
    one = Proposer(3, 1, None, 8, Sampler(False, 0.5))  # greedy proposals use T = 1
    torch.testing.assert_close(one.probs(logits), torch.softmax(logits[1, :, :8], -1))
    q = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    y = torch.tensor([0, 0])  # q(y) = 0.9 and 0.2
    doubting = Proposer(3, None, weights, 2, Sampler(), confidence_threshold=0.5)
    assert doubting.doubts(q, y, torch.tensor([False, False]))
    assert not doubting.doubts(q, y, torch.tensor([False, True]))  # the doubted row has finished
    assert not Proposer(3, None, weights, 2, Sampler()).doubts(q, y, torch.tensor([False, False]))
    with pytest.raises(TypeError, match="speculative_tokens must be an int, got bool"):
        Proposer(True, None, weights, 8, Sampler())
    with pytest.raises(ValueError, match="speculative_tokens must be >= 0, got -2"):
        Proposer(-2, None, weights, 8, Sampler())
    with pytest.raises(ValueError, match=r"confidence_threshold must be in \[0, 1\], got 2"):
        Proposer(2, None, weights, 8, Sampler(), confidence_threshold=2)


def _one_hot_logits(tokens: list[list[int]], V: int = 6) -> torch.Tensor:
    """``[B, g + 1, V]`` logits whose argmax at each position is the given token."""
    logits = torch.zeros(len(tokens), len(tokens[0]), V)
    logits.scatter_(-1, torch.tensor(tokens)[..., None], 5.0)
    return logits


def test_accept_greedy_cuts_at_the_batch_minimum_and_ignores_finished_rows():
    target = [[1, 2, 3, 4], [1, 5, 3, 4], [2, 2, 2, 2]]  # argmax p_0..p_3 per row
    proposal = Proposal([], [], torch.tensor([[1, 2, 3], [1, 2, 3], [0, 0, 0]]))
    unfinished = torch.zeros(3, dtype=torch.bool)
    cut, new = accept(proposal, _one_hot_logits(target), unfinished, None, Sampler())
    assert cut == 0 and new.tolist() == [[1], [1], [2]]  # row 2 rejects y_1
    finished = torch.tensor([False, False, True])  # row 2 has finished (by an eos): it no longer cuts
    cut, new = accept(proposal, _one_hot_logits(target), finished, torch.tensor([0]), Sampler())
    assert cut == 1 and new.tolist() == [[1, 2], [1, 5], [2, 2]]  # row 1 rejects y_2: the batch takes 1 + 1
    # an eos within row 1's accepted tokens: its later tokens are padding, it no longer limits the cut
    cut, new = accept(proposal, _one_hot_logits(target), finished, torch.tensor([5]), Sampler())
    assert cut == 3 and new.tolist() == target
    nothing = Proposal([], [], torch.empty(3, 0, dtype=torch.long))
    cut, new = accept(nothing, _one_hot_logits([[4], [3], [2]]), finished, None, Sampler())  # γ = 0
    assert cut == 0 and new.tolist() == [[4], [3], [2]]


def test_accept_sampling_keeps_proposals_the_target_agrees_with():
    """q = p: every proposal is accepted (u · q(y) < p(y) for u < 1) and a bonus token is drawn from
    p_g; p putting no mass on y rejects it and draws the correction from the residual (never y)."""
    logits = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(2))
    p = torch.softmax(logits, -1)
    y = torch.tensor([[0, 1], [2, 3]])
    same = Proposal([], list(p[:, :2].unbind(1)), y)
    cut, new = accept(same, logits, torch.zeros(2, dtype=torch.bool), None,
                      Sampler(True, 1.0, torch.Generator().manual_seed(0)))
    assert cut == 2 and torch.equal(new[:, :2], y) and new.shape == (2, 3)
    blocked = logits.clone()
    blocked[0, 0, 0] = -float("inf")  # p_0(y_1 = 0) = 0 in row 0: rejected at once
    for seed in range(20):
        cut, new = accept(same, blocked, torch.zeros(2, dtype=torch.bool), None,
                          Sampler(True, 1.0, torch.Generator().manual_seed(seed)))
        assert cut == 0 and new.shape == (2, 1) and new[0, 0] != 0
        assert new[1, 0] == 2  # row 1 accepted y_1: it keeps its proposal at the cut


@pytest.fixture(scope="module")
def models():
    target = tiny_model("llama", seed=5, num_hidden_layers=3)
    drafts = DraftEnsemble.from_base(target, 2, 1, seed=1, jitter=0.05)
    ids = torch.randint(0, 160, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    return target, drafts, ids, mask


def _decoder(target, drafts, gamma, batch) -> DraftDecoder:
    proposer = Proposer(gamma, 0, None, 160, Sampler())
    return DraftDecoder(target, drafts, None, proposer, None, batch.has_padding)


@pytest.mark.parametrize("forced_cut", [0, 1, 3])
def test_one_round_rolls_the_caches_back_to_the_accepted_prefix(models, forced_cut):
    """propose → verify → (a forced) accept → rollback: the target's cache keeps n + cut tokens, the
    drafts' as many (or, after a fully accepted round, all but y_g, which stays pending); a second
    round from there gives the tokens of a fresh greedy decode of the accepted prefix."""
    target, drafts, ids, mask = models
    batch = prepare(ids, mask, 8, None, None, target.config)
    decoder = _decoder(target, drafts, 3, batch)
    state = decoder.start(batch)
    window = state.window(3)
    drafted, window = decoder.propose(state, window)
    assert drafted.tokens.shape == (2, 3) and len(drafted.q) == 3 and decoder.draft_forwards == 3
    logits, _ = decoder.verify(state, window, drafted)
    assert logits.shape == (2, 4, 160) and decoder.target_cache.get_seq_length() == 5 + 3
    kept = torch.cat([drafted.tokens[:, :forced_cut], logits[:, forced_cut].argmax(-1, keepdim=True)], dim=1)
    emitted = stop_at_eos(kept, state.finished, None, None)
    state.advance(window, emitted)
    decoder.rollback(state, window, drafted, forced_cut)
    assert decoder.target_cache.get_seq_length() == 5 + forced_cut
    if forced_cut == 3:
        assert decoder.draft_cache.get_seq_length() == 5 + 2 and state.draft_pending.shape == (2, 2)
    else:
        assert decoder.draft_cache.get_seq_length() == 5 + forced_cut and state.draft_pending.shape == (2, 1)
    assert state.mask.shape == (2, 5 + forced_cut + 1) and state.proposed == [3]
    # the next round continues the accepted prefix exactly as decoding it afresh would
    window = state.window(2)
    drafted, window = decoder.propose(state, window)
    logits, _ = decoder.verify(state, window, drafted)
    prefix = torch.cat([ids, kept], dim=1)
    fresh = target.generate(input_ids=prefix, attention_mask=state.mask, max_new_tokens=1, do_sample=False,
                            pad_token_id=0)
    assert torch.equal(logits[:, 0].argmax(-1), fresh[:, -1])
