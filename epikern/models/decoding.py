"""The decoding core: the setup every decoder shares and the five steps of a speculative round.

Plain decoding is a round that proposes nothing (γ = 0); speculative decoding (design §4b) is the same
loop with γ ≥ 1. One round of :meth:`epikern.DraftEstimator.generate`::

    window = state.window(g)                                  # g ≤ γ proposals after n tokens
    drafted, window = decoder.propose(state, window)          # PROPOSE: K drafts, g batched steps → y, q
    logits, ref = decoder.verify(state, window, drafted)      # VERIFY: one target (+ proxy) forward, g + 1 rows
    cut, new = accept(drafted, logits, state.finished, ...)   # ACCEPT / REJECT: keep y_1..y_cut, + 1 token
    emitted = stop_at_eos(new, state.finished, eos, pad)      # tokens after a row's eos become pad
    score, state.deferred = decoder.score(state, window, drafted, ref, width)  # SCORE: one fused EU call
    state.advance(window, emitted)
    decoder.rollback(state, window, drafted, cut)             # ROLLBACK: crop the caches to n + cut

* **propose** — :meth:`DraftDecoder.propose`; the proposal distribution and τ stop: :class:`Proposer`.
* **verify** — :meth:`DraftDecoder.verify`.
* **accept / reject** — :func:`accept` (which proposals survive, the correction or bonus token); its
  tensor math (``min(1, p/q)``, the residual ``norm(max(0, p − q))``) is :mod:`epikern.models.speculative`.
* **score** — :meth:`DraftDecoder.score` (and :meth:`DraftDecoder.score_last` after the last round).
* **rollback** — :meth:`DraftDecoder.rollback` (``crop`` of the target, proxy and draft caches).

TokUR's generation (:meth:`epikern.TokUR.generate`) shares the setup (:func:`prepare`, :class:`Sampler`),
the eos rule (:func:`stop_at_eos`) and the result (:class:`Transcript`), without drafts or rounds.

*Batches*: the rows advance together by the smallest accepted count n (rows finished by eos do not
count). This is lossless: each row's first n accepted proposals are its target's own tokens
(greedy) or exact samples (sampling), and row b's token at position n is its accepted proposal if
it accepted more, else its correction or bonus token; whether a row is cut early depends only on
the other rows, never on its own later tokens, so cutting never changes a row's output (greedy) or
its distribution (sampling); the proposals after the cut are discarded.

*Uncertainty*: every emitted token gets the drafts' and the reference's distributions at its
prefix, which speculative decoding has already computed (draft step j, target position j), so one
fused :func:`epikern.draft_uncertainty` call per round scores the round's tokens (drafts
``[K, B, n + 1, V]`` against target or proxy logits) with no extra target forward; the numbers
equal plain decoding's (up to float round-off of the batched forwards). The drafts' distribution
after a fully accepted round's last proposal comes from the first draft step of the next round,
which then consumes two tokens (that proposal and the bonus token), so scoring costs no draft step
either; after the last round one more draft step scores the final token if needed.

*Host synchronisation*: once at the start, whether ``attention_mask`` has padding (without it the
drafts run mask-free); then plain decoding reads the device only for the all-rows-finished check,
made only when an eos id is given; speculative decoding also reads the accepted count of each round
(one int, needed to crop the caches) and, with τ > 0, one bool per draft step (whether to stop
proposing).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from ..ops import DraftUncertainty
from .draft_ensemble import DraftEnsemble
from .hf import lm_logits
from .masks import nan_where_not, position_ids_from_mask
from .speculative import greedy_accepted, last_token_of_round, proposal_probs, propose, sampling_accepted


# --------------------------------------------------------------------------------------------
# the setup every decoder shares


@dataclass(frozen=True)
class Sampler:
    """How a token is chosen from the target's logits: argmax, or a sample of
    ``softmax(logits / temperature)`` drawn with ``generator``."""

    do_sample: bool = False
    temperature: float = 1.0
    generator: Optional[torch.Generator] = None

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")

    def probs(self, logits: Tensor) -> Tensor:
        """``softmax(logits / T)`` in float32 over the last dim."""
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def pick(self, logits: Tensor) -> Tensor:
        """One token per row ``[B]`` of ``logits [B, V]``."""
        if self.do_sample:
            return torch.multinomial(self.probs(logits), 1, generator=self.generator).squeeze(1)
        return logits.argmax(dim=-1)


@dataclass
class Batch:
    """The prompts of a generate call, checked, with what eos handling needs."""

    input_ids: Tensor  #: [B, T0] prompts, left-padded
    attention_mask: Optional[Tensor]  #: [B, T0] as given (0 = padding) or None
    mask: Tensor  #: [B, T0] the attention mask, ones where none was given
    eos: Optional[Tensor]  #: [E] ids that end a row, or None
    pad: Optional[int]  #: the id of a row's tokens after its eos

    @functools.cached_property
    def has_padding(self) -> bool:
        """Whether any prompt is padded (one host read; without padding the drafts run mask-free)."""
        return self.attention_mask is not None and not bool(self.attention_mask.all())


def prepare(input_ids: Tensor, attention_mask: Optional[Tensor], max_new_tokens: int,
            eos_token_id: Union[None, int, Sequence[int]], pad_token_id: Optional[int], config) -> Batch:
    """Check a generate call's prompts and budget; the eos ids, and the pad id: ``pad_token_id``, else
    ``config.pad_token_id`` (the target's), else the first eos id.

    Raises:
        ValueError: negative ``max_new_tokens``; ``input_ids`` not ``[B, T0]`` with T0 ≥ 1.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [B, T0] with T0 >= 1, got shape {tuple(input_ids.shape)}")
    device = input_ids.device
    mask = torch.ones_like(input_ids, dtype=torch.long) if attention_mask is None else attention_mask
    eos = None if eos_token_id is None else torch.as_tensor(eos_token_id, device=device).flatten()
    pad = getattr(config, "pad_token_id", None) if pad_token_id is None else pad_token_id
    pad = int(eos[0]) if pad is None and eos is not None else pad
    return Batch(input_ids, attention_mask, mask, eos, pad)


class Emitted(NamedTuple):
    """A round's tokens after the eos rule (:func:`stop_at_eos`)."""

    tokens: Tensor  #: [B, n] the emitted ids, pad after a row's eos
    alive: Tensor  #: [B, n] bool, True up to and including each row's first eos
    finished: Tensor  #: [B] bool, rows that have emitted an eos
    done: bool  #: every row has finished


def stop_at_eos(new: Tensor, finished: Tensor, eos: Optional[Tensor], pad: Optional[int]) -> Emitted:
    """A round's tokens ``new [B, n]`` after eos.

    ``alive [B, n]`` marks the tokens up to and including each row's first eos (none for a row
    finished before the round); later tokens become ``pad``. When every row has finished, ``done``
    is True and the columns after the last eos are dropped, as plain decoding stops there. Without
    eos nothing changes (and nothing is read from the device); with eos this is one read.
    """
    alive = (~finished)[:, None].expand_as(new)
    if eos is None:
        return Emitted(new, alive, finished, False)
    is_eos = torch.isin(new, eos)
    alive = alive & ~((is_eos.cumsum(1) - is_eos.long()) > 0)  # no earlier eos this round
    finished = finished | (is_eos & alive).any(1)
    width, done = torch.stack([alive.any(0).sum(), finished.all()]).tolist()
    return Emitted(new.masked_fill(~alive, pad)[:, :width], alive[:, :width], finished, bool(done))


class Transcript:
    """The emitted tokens of a generate call and their uncertainty (a NamedTuple of ``[..., B, n]``
    fields per round), joined at the end."""

    def __init__(self):
        self.tokens, self.alive, self.scores = [], [], []

    def add(self, emitted: Emitted, score: Optional[NamedTuple] = None) -> None:
        self.tokens.append(emitted.tokens)
        self.alive.append(emitted.alive)
        self.add_score(score)

    def add_score(self, score: Optional[NamedTuple]) -> None:
        if score is not None:
            self.scores.append(score)

    def finish(self, input_ids: Tensor, empty: Optional[NamedTuple]) -> tuple[Tensor, Tensor, Optional[NamedTuple]]:
        """``(sequences [B, T0 + N], generated_mask [B, N], uncertainty)``; the uncertainty is NaN
        after each row's eos, ``empty`` when nothing was generated, None when nothing was scored."""
        if not self.tokens:
            return input_ids, input_ids.new_empty(input_ids.shape[0], 0).bool(), empty
        generated_mask = torch.cat(self.alive, dim=1)
        u = None
        if self.scores:
            joined = type(self.scores[0])(*(torch.cat(field, dim=-1) for field in zip(*self.scores)))
            u = nan_where_not(joined, generated_mask)
        return torch.cat([input_ids, *self.tokens], dim=1), generated_mask, u


# --------------------------------------------------------------------------------------------
# a speculative round


@dataclass(frozen=True)
class Proposer:
    """How a round proposes: from the mixture ``q̄ = Σ_k w_k softmax(z_k / T)`` (``draft`` None) or
    from draft ``draft`` alone, on the first ``vocab`` ids (the vocabulary drafts and target share);
    its argmax when greedy, a sample otherwise.

    *Adaptive rounds* (``confidence_threshold`` τ > 0): a round stops proposing after a proposal y
    whose proposal probability q(y) is below τ in some unfinished row, so γ becomes the most a round
    proposes (transformers' ``assistant_confidence_threshold``; the adaptive candidate length of
    SpecDec++). A proposal the drafts doubt is likely rejected, and every draft step after it would
    be wasted with it. The stop depends only on the drafts, never on the target, so greedy output
    stays the target's and sampled output stays exactly the target's law.
    """

    speculative_tokens: int  #: γ, the most proposals a round makes
    draft: Optional[int]  #: the draft that proposes, or None for the mixture
    weights: Optional[Tensor]  #: [K] float32 mixture weights (with ``draft`` None)
    vocab: int  #: proposals come from ids ``[0, vocab)``
    sampler: Sampler  #: greedy or sampled proposals; T = its temperature when sampling, else 1
    confidence_threshold: float = 0.0  #: τ

    def __post_init__(self):
        γ, τ = self.speculative_tokens, self.confidence_threshold
        if not isinstance(γ, int) or isinstance(γ, bool):
            raise TypeError(f"speculative_tokens must be an int, got {type(γ).__name__}")
        if γ < 0:
            raise ValueError(f"speculative_tokens must be >= 0, got {γ}")
        if not 0 <= τ <= 1:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {τ}")

    def probs(self, draft_logits: Tensor) -> Tensor:
        """Proposal distribution ``[B, vocab]`` of the drafts' logits ``[K, B, V]`` at one position."""
        temperature = self.sampler.temperature if self.sampler.do_sample else 1.0
        return proposal_probs(draft_logits[..., :self.vocab], self.weights, self.draft, temperature)

    def doubts(self, q: Tensor, y: Tensor, finished: Tensor) -> bool:
        """Whether ``q(y) < τ`` in some unfinished row (one host read; False without τ)."""
        if not self.confidence_threshold:
            return False
        confidence = q.gather(1, y[:, None]).squeeze(1)
        return bool(((confidence < self.confidence_threshold) & ~finished).any())


class Window(NamedTuple):
    """A round that proposes g tokens after the n tokens so far (prompt and emitted)."""

    n: int
    g: int
    mask: Tensor  #: [B, n + g] attention mask
    positions: Tensor  #: [B, n + g] position ids

    def shrink(self, g: int) -> "Window":
        """The same round with g proposals (after a confidence stop)."""
        return Window(self.n, g, self.mask[:, :self.n + g], self.positions[:, :self.n + g])


@dataclass
class RoundState:
    """Where decoding stands between rounds; the caches hold ``n − len(pending)`` tokens."""

    mask: Tensor  #: [B, n] attention mask of the prompt and the emitted tokens
    pending: Tensor  #: [B, t] tokens the target (and proxy) have not consumed: the prompt, then the last token
    #: the same for the drafts; one token longer after a fully accepted round, whose last proposal they
    #: have not consumed
    draft_pending: Tensor
    finished: Tensor  #: [B] bool, rows past their eos
    #: [B, V] reference logits of a fully accepted round's bonus token, scored when the drafts' next step
    #: supplies their distribution
    deferred: Optional[Tensor] = None
    emitted: int = 0  #: tokens emitted per row so far
    proposed: list = field(default_factory=list)  #: g of each round
    accepted: list = field(default_factory=list)  #: proposals the batch accepted in each round

    @classmethod
    def start(cls, batch: Batch) -> "RoundState":
        finished = torch.zeros(batch.input_ids.shape[0], dtype=torch.bool, device=batch.input_ids.device)
        return cls(batch.mask, batch.input_ids, batch.input_ids, finished)

    def window(self, g: int) -> Window:
        """The round's mask and positions, grown by g proposals."""
        n = self.mask.shape[1]
        grown = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], g)], dim=1)
        return Window(n, g, grown, position_ids_from_mask(grown, grown.shape[1]))

    def advance(self, window: Window, emitted: Emitted) -> None:
        """Past a round of ``window.g`` proposals that emitted ``emitted``: its last token is pending."""
        width = emitted.tokens.shape[1]
        self.pending = emitted.tokens[:, -1:]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], width)], dim=1)
        self.finished, self.emitted = emitted.finished, self.emitted + width
        self.proposed.append(window.g)
        self.accepted.append(width - 1)


class Proposal(NamedTuple):
    """What the drafts computed in a round."""

    draft_logits: list  #: [K, B, V] at each position the drafts ran (first the deferred one, if any)
    q: list  #: g proposal distributions [B, vocab]
    tokens: Tensor  #: [B, g] the proposals y_1..y_g


@dataclass(frozen=True)
class DecodingStats:
    """Work and acceptance of one :meth:`~epikern.DraftEstimator.generate` call.

    A round is one target forward; it emits ``accepted[r] + 1`` tokens per row (the batch's common
    count, design §4b). Plain decoding (γ = 0) has one round per token and proposes nothing.
    """

    speculative_tokens: int  #: γ
    #: g per round: proposals verified (γ; fewer near max_new_tokens or after a confidence stop)
    proposed: tuple[int, ...]
    accepted: tuple[int, ...]  #: proposals every row of the batch accepted, per round
    target_forwards: int  #: forwards of the target (= rounds)
    draft_forwards: int  #: batched steps of the DraftEnsemble (all K drafts at once)
    reference_forwards: int  #: forwards of the proxy reference (0 when p is the target itself)

    @property
    def rounds(self) -> int:
        return len(self.proposed)

    @property
    def acceptance_rate(self) -> float:
        """Accepted ÷ proposed over the call (NaN when nothing was proposed)."""
        total = sum(self.proposed)
        return sum(self.accepted) / total if total else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Mean tokens emitted per row per target forward, ``mean(accepted + 1)`` (NaN: no rounds)."""
        return (sum(self.accepted) + self.rounds) / self.rounds if self.rounds else float("nan")

    def as_dict(self) -> dict:
        return {"speculative_tokens": self.speculative_tokens, "rounds": self.rounds,
                "proposed": list(self.proposed), "accepted": list(self.accepted),
                "acceptance_rate": self.acceptance_rate, "tokens_per_round": self.tokens_per_round,
                "target_forwards": self.target_forwards, "draft_forwards": self.draft_forwards,
                "reference_forwards": self.reference_forwards}


class DraftDecoder:
    """The target, the K drafts and the optional proxy of one generate call, with their caches.

    Args:
        target: HF causal LM that verifies (and, at γ = 0, generates).
        drafts: the :class:`DraftEnsemble` that proposes and is scored.
        proxy: the reference of the uncertainty if it is not the target, else None.
        proposer: how rounds propose (γ, mixture or one draft, τ).
        scorer: the fused uncertainty call (drafts ``[K, B, n, V]`` and reference ``[B, n, V]``), or
            None to skip the uncertainty (then the drafts run only to propose).
        has_padding: whether the prompts are padded (the drafts then get the attention mask).
    """

    def __init__(self, target: nn.Module, drafts: DraftEnsemble, proxy: Optional[nn.Module], proposer: Proposer,
                 scorer, has_padding: bool):
        self.target, self.drafts, self.proxy, self.proposer, self.scorer = target, drafts, proxy, proposer, scorer
        self.has_padding = has_padding
        self.speculative = proposer.speculative_tokens > 0
        self.target_cache = DynamicCache(config=target.config)
        self.proxy_cache = None if proxy is None else DynamicCache(config=proxy.config)
        self.draft_cache = None  # made by :meth:`start` for the batch
        if self.speculative:  # sliding-window layers keep their states until a crop trims them
            for cache in self._reference_caches():
                cache.activate_past_recording()
        self.draft_forwards = self.reference_forwards = 0

    def start(self, batch: Batch) -> RoundState:
        """A fresh draft cache for the batch and the state before the first round."""
        self.draft_cache = self.drafts.new_cache(batch.input_ids.shape[0])
        return RoundState.start(batch)

    def _reference_caches(self) -> list:
        return [c for c in (self.target_cache, self.proxy_cache) if c is not None]

    def propose(self, state: RoundState, window: Window) -> tuple[Proposal, Window]:
        """PROPOSE: the drafts' batched steps of a round, and the round's window (shrunk after a
        confidence stop).

        Step j consumes ``draft_pending`` (j = 0) or ``y_j`` and, for j < g, proposes ``y_{j+1}``
        from :meth:`Proposer.probs`; the steps end after a doubted proposal (:meth:`Proposer.doubts`).
        With uncertainty the drafts take at least one step (the distribution of the round's first
        token), and the first step also returns the distribution after the previous round's last
        proposal when its bonus token is ``deferred``.
        """
        n, g = window.n, window.g
        deferred = state.deferred is not None
        steps = max(g, 1) if self.scorer is not None else g
        rows, q, ys = [], [], []
        for j in range(steps):
            ids = state.draft_pending if j == 0 else ys[-1][:, None]
            logits = self.drafts(ids, window.mask[:, :n + j] if self.has_padding else None, self.draft_cache,
                                 position_ids=window.positions[:, n + j - ids.shape[1]:n + j],
                                 logits_to_keep=2 if j == 0 and deferred else 1)
            rows.extend(logits.unbind(2))
            if j < g:
                q.append(self.proposer.probs(rows[-1]))
                ys.append(propose(q[-1], self.proposer.sampler.do_sample, self.proposer.sampler.generator))
                if j + 1 < g and self.proposer.doubts(q[-1], ys[-1], state.finished):
                    break
        self.draft_forwards += len(rows) - deferred
        tokens = torch.stack(ys, dim=1) if ys else state.pending[:, :0]
        return Proposal(rows, q, tokens), window if len(ys) == g else window.shrink(len(ys))

    def verify(self, state: RoundState, window: Window, proposal: Proposal) -> tuple[Tensor, Tensor]:
        """VERIFY: one target forward over the pending tokens and the g proposals: its logits
        ``[B, g + 1, V]`` and the reference's (the same tensor, or the proxy's from its own forward)."""
        ids = torch.cat([state.pending, proposal.tokens], dim=1)
        positions = window.positions[:, window.n - state.pending.shape[1]:]
        logits = lm_logits(self.target, ids, window.mask, positions, self.target_cache, window.g + 1)
        if self.proxy is None:
            return logits, logits
        self.reference_forwards += 1
        return logits, lm_logits(self.proxy, ids, window.mask, positions, self.proxy_cache, window.g + 1)

    def score(self, state: RoundState, window: Window, proposal: Proposal, ref: Tensor, width: int
              ) -> tuple[Optional[NamedTuple], Optional[Tensor]]:
        """SCORE: one fused uncertainty call for the round's ``width`` emitted tokens that have draft
        logits (after the previous round's deferred token); returns it and the new deferred logits,
        the bonus token's ``ref[:, g]`` when the drafts have not run after the round's last proposal."""
        if self.scorer is None:
            return None, None
        deferred = state.deferred is not None
        scored = min(width, len(proposal.draft_logits) - deferred)
        rows = proposal.draft_logits[:scored + deferred]
        refs = ref[:, :scored] if not deferred else torch.cat([state.deferred[:, None], ref[:, :scored]], dim=1)
        u = self.scorer(torch.stack(rows, dim=2), refs)
        return u, ref[:, window.g] if scored < width else None

    def rollback(self, state: RoundState, window: Window, proposal: Proposal, cut: int) -> None:
        """ROLLBACK of the rejected proposals (``state`` already advanced past the round): the caches of
        the target and the proxy keep ``n + cut`` tokens (``crop`` also trims sliding-window layers back
        to their window); the drafts' keep as many, or, after a fully accepted round, have ``y_g``
        still to consume (it goes first next round)."""
        n, g = window.n, window.g
        state.draft_pending = state.pending
        if not self.speculative:
            return
        for cache in self._reference_caches():
            cache.crop(cut - g)
        if g and cut == g:
            state.draft_pending = torch.cat([proposal.tokens[:, -1:], state.pending], dim=1)
        elif proposal.draft_logits:  # (with no draft step, in the last round, they never run again)
            self.draft_cache.crop(n + cut - self.draft_cache.get_seq_length())

    def score_last(self, state: RoundState) -> Optional[NamedTuple]:
        """SCORE the last round's bonus token if it was deferred: one more draft step, after ``y_g``."""
        if state.deferred is None:
            return None
        before = state.mask[:, :-1]
        logits = self.drafts(state.draft_pending[:, :1], before if self.has_padding else None, self.draft_cache,
                             position_ids=position_ids_from_mask(before, 1), logits_to_keep=1)
        self.draft_forwards += 1
        return self.scorer(logits, state.deferred[:, None])

    def empty_score(self, input_ids: Tensor) -> Optional[DraftUncertainty]:
        """The uncertainty of zero generated tokens (``[B, 0]`` fields, ``draft_lse [K, B, 0]``), or
        None without a scorer."""
        if self.scorer is None:
            return None
        nan = torch.full((input_ids.shape[0], 0), float("nan"), device=input_ids.device)
        return DraftUncertainty(*([nan] * 6), draft_lse=nan.expand(self.drafts.num_drafts, *nan.shape), target_lse=nan)

    def stats(self, state: RoundState) -> DecodingStats:
        return DecodingStats(self.proposer.speculative_tokens, tuple(state.proposed), tuple(state.accepted),
                             len(state.proposed), self.draft_forwards, self.reference_forwards)


def accept(proposal: Proposal, logits: Tensor, finished: Tensor, eos: Optional[Tensor], sampler: Sampler
           ) -> tuple[int, Tensor]:
    """ACCEPT / REJECT: the batch's accepted count n (``cut``) and its emitted tokens ``[B, n + 1]``.

    Greedy rows accept while the proposal is the target's argmax; sampled rows by speculative
    sampling (accept y with probability ``min(1, p(y)/q(y))``, on rejection draw from
    ``norm(max(0, p − q))``, a bonus token from p when all g are accepted; see
    :mod:`epikern.models.speculative`), so the greedy output is the target's greedy output and the
    sampled output is distributed exactly as the target's. The proposals after ``cut`` are rejected
    (their cache entries are rolled back by :meth:`DraftDecoder.rollback`).

    ``logits [B, g + 1, V]`` are the target's over the round. A row that has finished, or whose eos
    lies within its accepted tokens, does not limit n (its later tokens are padding anyway). Reads n
    on the host (the one read of a round).
    """
    y, q = proposal.tokens, proposal.q
    g = y.shape[1]
    if sampler.do_sample:
        p = sampler.probs(logits)
        accepted = sampling_accepted(y, torch.stack(q, dim=1), p, sampler.generator) if g else None
    else:
        target_tokens = logits.argmax(dim=-1)
        accepted = greedy_accepted(y, target_tokens) if g else None
    cut = 0
    if g:
        if eos is not None:
            stream = y if sampler.do_sample else target_tokens  # the tokens a row emits if it is not cut
            within = torch.arange(stream.shape[1], device=y.device) < (accepted + (not sampler.do_sample))[:, None]
            accepted = torch.where(finished | (torch.isin(stream, eos) & within).any(1), g, accepted)
        cut = int(accepted.min())
    if not sampler.do_sample:
        return cut, target_tokens[:, :cut + 1]
    last = last_token_of_round(y, accepted, cut, p[:, cut], q[cut] if cut < g else None, sampler.generator)
    return cut, torch.cat([y[:, :cut], last[:, None]], dim=1)


__all__ = ["Batch", "DecodingStats", "DraftDecoder", "Emitted", "Proposal", "Proposer", "RoundState", "Sampler",
           "Transcript", "Window", "accept", "prepare", "stop_at_eos"]
