"""``ek.DraftEstimator``: per-token epistemic uncertainty of a target LM from a DraftEnsemble.

Alignment (both methods): the value at token position t scores the **next-token distribution after
token t**, i.e. the distributions that predict token t + 1. In :meth:`DraftEstimator.generate`
column j scores the distribution from which generated token j was chosen, so for a prompt of length
T0, ``generate(...).uncertainty[:, j]`` equals ``score(sequences)[:, T0 - 1 + j]``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from ..ops import DraftUncertainty, DraftUncertaintyScorer
from ..ops._checks import uniform_or_checked_weights
from .draft_ensemble import DraftEnsemble
from .loading import model_vocab_size
from .masks import causal_mask, position_ids_from_mask
from .speculative import (MIXTURE, DecodingStats, check_proposal, greedy_accepted, last_token_of_round,
                          proposal_probs, propose, sampling_accepted)


class GenerationResult(NamedTuple):
    """What :meth:`DraftEstimator.generate` returns (N ≤ ``max_new_tokens`` generated tokens)."""

    sequences: Tensor  #: [B, T0 + N] prompt then generated ids (pad after a row's eos)
    #: fields [B, N] (draft_lse [K, B, N]); NaN after a row's eos; None with ``with_uncertainty=False``
    uncertainty: Optional[DraftUncertainty]
    generated_mask: Tensor  #: [B, N] bool, True for generated tokens up to and including eos
    stats: Optional[DecodingStats] = None  #: rounds, acceptance and forwards of each model


class DraftEstimator:
    """Token-level EU of ``target`` from K drafts, against the target or an OSD proxy (SPEC §1).

    Args:
        target: HF causal LM that generates the text.
        drafts: the :class:`DraftEnsemble` (same tokenizer; a padded vocabulary is compared on the
            shared prefix).
        reference: the distribution p of ``kl``/``eu``: None for the target itself, or a proxy HF
            causal LM (``p_mix`` trained by OSD) with the target's vocabulary.
        weights, eu_temperature, decompose, backend: passed to :func:`epikern.draft_uncertainty`
            (``eu_temperature`` scales every distribution of the uncertainty, not the sampling).
    """

    def __init__(self, target: nn.Module, drafts: DraftEnsemble, reference: Optional[nn.Module] = None, *,
                 weights: Union[None, Sequence[float], Tensor] = None, eu_temperature: float = 1.0,
                 decompose: bool = True, backend: Optional[str] = None):
        if not isinstance(drafts, DraftEnsemble):
            raise TypeError(f"drafts must be a DraftEnsemble, got {type(drafts).__name__}")
        if reference is not None and model_vocab_size(reference) != model_vocab_size(target):
            raise ValueError(
                f"the reference (proxy) has a vocabulary of {model_vocab_size(reference)} logits but the target has "
                f"{model_vocab_size(target)}: a proxy distilled from the target must share its vocabulary")
        self.target, self.drafts, self.reference = target, drafts, reference
        self.weights, self.eu_temperature, self.decompose, self.backend = weights, eu_temperature, decompose, backend

    @property
    def _reference(self) -> nn.Module:
        return self.target if self.reference is None else self.reference

    @torch.no_grad()
    def score(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
              chunk_size: Optional[int] = None) -> DraftUncertainty:
        """Per-token uncertainty of a given sequence (teacher forcing).

        Args:
            input_ids: ``[B, T]``; attention_mask: ``[B, T]`` (0 = padding) or None.
            chunk_size: score the sequence ``chunk_size`` tokens at a time through the KV caches, so
                that at most ``(K + 1)·B·chunk_size·V`` logits exist at once (default: all T at once).

        Returns:
            :class:`~epikern.DraftUncertainty` with ``[B, T]`` fields (``draft_lse [K, B, T]``);
            position t scores the next-token distribution after token t; padding positions are NaN.
        """
        B, T = input_ids.shape
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if attention_mask is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        else:
            positions = position_ids_from_mask(attention_mask, T)
        step = T if chunk_size is None else chunk_size
        chunked = step < T
        ref_cache = DynamicCache(config=self._reference.config) if chunked else None
        draft_cache = self.drafts.new_cache(B) if chunked else None
        uncertainty = self._scorer(input_ids.device)
        parts = []
        for start in range(0, T, step):
            ids, pos = input_ids[:, start:start + step], positions[:, start:start + step]
            mask = None if attention_mask is None else attention_mask[:, :start + step]
            ref = lm_logits(self._reference, ids, mask, pos, ref_cache, 0)
            parts.append(uncertainty(self.drafts(ids, mask, draft_cache, position_ids=pos), ref))
        u = DraftUncertainty(*(torch.cat(field, dim=-1) for field in zip(*parts)))
        return u if attention_mask is None else nan_where_not(u, attention_mask.bool())

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0,
                 eos_token_id: Union[None, int, Sequence[int]] = None,
                 generator: Optional[torch.Generator] = None, speculative_tokens: int = 0,
                 proposal: Union[str, int] = MIXTURE, confidence_threshold: float = 0.0,
                 with_uncertainty: bool = True) -> GenerationResult:
        """Decode with the target, speculatively with the drafts' proposals when ``speculative_tokens`` > 0.

        **Plain decoding** (γ = ``speculative_tokens`` = 0): each step runs the target (its own
        ``DynamicCache``), the reference if it is a proxy, one batched step of all K drafts, and one
        fused :func:`epikern.draft_uncertainty` call on the last position.

        **Speculative decoding** (γ ≥ 1, SPEC §4b), by rounds. The K drafts advance γ batched steps
        on their shared :class:`~epikern.models.DraftCache`; step j proposes token j + 1 from the
        mixture ``q̄ = Σ_k w_k softmax(z_k / T)`` (the estimator's ``weights``; T = ``temperature``
        when sampling, 1 when greedy), or from draft ``proposal`` alone: its argmax when greedy, a
        sample otherwise. The target verifies all γ + 1 positions in one forward; greedy rows accept
        while the proposal is the target's argmax, sampled rows by speculative sampling (accept y
        with probability ``min(1, p(y)/q̄(y))``, on rejection draw from ``norm(max(0, p − q̄))``, a
        bonus token from p when all γ are accepted; see :mod:`epikern.models.speculative`), so the
        greedy output is the target's greedy output and the sampled output is distributed exactly as
        the target's. The caches of the target, the proxy and the drafts are rolled back with
        ``crop``. Near ``max_new_tokens`` a round proposes fewer tokens, so none is wasted.

        *Adaptive rounds* (``confidence_threshold`` τ > 0): a round stops proposing after a proposal
        y whose proposal probability q(y) is below τ in some unfinished row, so γ becomes the most a
        round proposes (transformers' ``assistant_confidence_threshold``; the adaptive candidate
        length of SpecDec++). A proposal the drafts doubt is likely rejected, and every draft step
        after it would be wasted with it. The stop depends only on the drafts, never on the target,
        so greedy output stays the target's and sampled output stays exactly the target's law.

        *Batches*: the rows advance together by the smallest accepted count n (rows finished by eos
        do not count). This is lossless: each row's first n accepted proposals are its target's own
        tokens (greedy) or exact samples (sampling), and row b's token at position n is its
        accepted proposal if it accepted more, else its correction or bonus token; whether a row is
        cut early depends only on the other rows, never on its own later tokens, so cutting never
        changes a row's output (greedy) or its distribution (sampling); the proposals after the cut
        are discarded.

        *Uncertainty*: every emitted token gets the drafts' and the reference's distributions at its
        prefix, which speculative decoding has already computed (draft step j, target position j),
        so one fused :func:`epikern.draft_uncertainty` call per round scores the round's tokens
        (drafts ``[K, B, n + 1, V]`` against target or proxy logits) with no extra target forward;
        the numbers equal plain decoding's (up to float round-off of the batched forwards). The
        drafts' distribution after a fully accepted round's last proposal comes from the first
        draft step of the next round, which then consumes two tokens (that proposal and the bonus
        token), so scoring costs no draft step either; after the last round one more draft step
        scores the final token if needed.

        *Host synchronisation*: once at the start, whether ``attention_mask`` has padding (without
        it the drafts run mask-free); then plain decoding reads the device only for the
        all-rows-finished check, made only when ``eos_token_id`` is given; speculative decoding also
        reads the accepted count of each round (one int, needed to crop the caches) and, with τ > 0,
        one bool per draft step (whether to stop proposing).

        Args:
            input_ids: ``[B, T0]`` prompts, left-padded if their lengths differ.
            attention_mask: ``[B, T0]`` (0 = padding) or None.
            max_new_tokens: N ≥ 0.
            do_sample: sample from ``softmax(target_logits / temperature)``; else greedy (argmax).
            temperature: sampling temperature (> 0), used only with ``do_sample``.
            eos_token_id: id(s) ending a row; later tokens of that row are the target's
                ``pad_token_id`` (or the first eos id) and their uncertainty is NaN.
            generator: random generator for sampling (proposals, acceptance and target samples).
            speculative_tokens: γ ≥ 0 proposals per round (0: plain decoding).
            proposal: ``"mixture"`` or a draft index k in ``[0, K)``.
            confidence_threshold: τ in [0, 1]: end a round's proposals after one with q(y) < τ
                (0: always γ proposals).
            with_uncertainty: False skips the uncertainty (and the proxy reference, and at γ = 0 the
                drafts); the result's ``uncertainty`` is then None.

        Returns:
            :class:`GenerationResult`; its ``stats`` count rounds, acceptance and forwards.

        Raises:
            ValueError: negative ``max_new_tokens`` or γ, ``proposal`` out of range, τ outside
                [0, 1], sampling with a non-positive temperature. TypeError: a non-integer γ.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if not isinstance(speculative_tokens, int) or isinstance(speculative_tokens, bool):
            raise TypeError(f"speculative_tokens must be an int, got {type(speculative_tokens).__name__}")
        if speculative_tokens < 0:
            raise ValueError(f"speculative_tokens must be >= 0, got {speculative_tokens}")
        if not 0 <= confidence_threshold <= 1:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
        K = self.drafts.num_drafts
        draft = check_proposal(proposal, K)
        B, T0 = input_ids.shape
        device = input_ids.device
        mask = torch.ones(B, T0, dtype=torch.long, device=device) if attention_mask is None else attention_mask
        # without padding the drafts' causal attention needs no mask (decode steps skip building one)
        padded = attention_mask is not None and not bool(attention_mask.all())
        eos = None if eos_token_id is None else torch.as_tensor(eos_token_id, device=device).flatten()
        pad = getattr(self.target.config, "pad_token_id", None)
        pad = int(eos[0]) if pad is None and eos is not None else pad
        proxy = self.reference if with_uncertainty else None
        uncertainty = self._scorer(device) if with_uncertainty else None
        target_cache = DynamicCache(config=self.target.config)
        proxy_cache = None if proxy is None else DynamicCache(config=proxy.config)
        draft_cache = self.drafts.new_cache(B)
        if speculative_tokens:  # sliding-window layers keep their states until a crop trims them
            for cache in (target_cache, proxy_cache):
                if cache is not None:
                    cache.activate_past_recording()
        # proposals come from the vocabulary the drafts and the target share
        vocab = min(self.drafts.vocab_size, model_vocab_size(self.target))
        mixture_weights = None if draft is not None else \
            uniform_or_checked_weights(self.weights, K, device)
        sampling_temperature = temperature if do_sample else 1.0

        def proposer(draft_logits: Tensor) -> Tensor:  # [K, B, V] -> proposal distribution [B, vocab]
            return proposal_probs(draft_logits[..., :vocab], mixture_weights, draft, sampling_temperature)

        finished = torch.zeros(B, dtype=torch.bool, device=device)
        # ``pending``: tokens the target has not consumed (the prompt, then the last emitted token);
        # ``draft_pending``: the same for the drafts, one token longer after a fully accepted round,
        # whose last proposal they have not consumed; ``deferred``: that round's bonus token's
        # reference logits [B, V], scored when the drafts' next step supplies their distribution.
        pending = draft_pending = input_ids
        deferred = None
        tokens, live, scores, proposed, accepted = [], [], [], [], []
        forwards = {"draft": 0, "reference": 0}
        emitted = 0
        while emitted < max_new_tokens:
            g = min(speculative_tokens, max_new_tokens - emitted - 1)
            n = mask.shape[1]  # sequence length so far; the caches hold n - len(pending) tokens
            grown = torch.cat([mask, mask.new_ones(B, g)], dim=1)
            positions = position_ids_from_mask(grown, grown.shape[1])

            # drafts: g steps propose y_1..y_g (at least one step when scoring, for the EU of token 0)
            steps = max(g, 1) if with_uncertainty else g
            draft_rows, q, ys = self._propose(draft_pending, grown if padded else None, positions, n, g, steps,
                                              deferred is not None, draft_cache, proposer, do_sample, generator,
                                              confidence_threshold, finished)
            forwards["draft"] += len(draft_rows) - (deferred is not None)
            if len(ys) < g:  # the confidence stop ended the round early
                g = len(ys)
                grown, positions = grown[:, :n + g], positions[:, :n + g]

            # target (and proxy): verify the round in one forward, g + 1 positions
            verify = torch.cat([pending, *(y[:, None] for y in ys)], dim=1)
            verify_positions = positions[:, n - pending.shape[1]:]
            logits = lm_logits(self.target, verify, grown, verify_positions, target_cache, g + 1)
            ref = logits if proxy is None else \
                lm_logits(proxy, verify, grown, verify_positions, proxy_cache, g + 1)
            forwards["reference"] += int(proxy is not None)
            y = torch.stack(ys, dim=1) if ys else verify[:, :0]
            cut, new = _accept(y, q, logits, finished, eos, do_sample, temperature, generator)

            new, alive, finished, done = _stop_at_eos(new, finished, eos, pad)
            width = new.shape[1]
            tokens.append(new)
            live.append(alive)
            emitted += width
            proposed.append(g)
            accepted.append(width - 1)

            if with_uncertainty:  # the round's tokens that have draft logits, after the deferred one
                scored = min(width, len(draft_rows) - (deferred is not None))
                rows = draft_rows[: scored + (deferred is not None)]
                refs = ref[:, :scored] if deferred is None else torch.cat([deferred[:, None], ref[:, :scored]], 1)
                scores.append(uncertainty(torch.stack(rows, dim=2), refs))
                deferred = ref[:, g] if scored < width else None  # a fully accepted round's bonus token
            pending = new[:, -1:]
            if speculative_tokens:  # roll back the rejected proposals: keep n + cut tokens
                for cache in (target_cache, proxy_cache):
                    if cache is not None:
                        cache.crop(cut - g)  # also trims sliding-window layers back to their window
                if g and cut == g:  # the drafts have not consumed y_g: it goes first next round
                    draft_pending = torch.cat([y[:, -1:], pending], dim=1)
                elif draft_rows:  # (with no draft step, in the last round, they never run again)
                    draft_cache.crop(n + cut - draft_cache.get_seq_length())
                    draft_pending = pending
            else:
                draft_pending = pending
            mask = torch.cat([mask, mask.new_ones(B, width)], dim=1)
            if done:
                break
        if deferred is not None:  # the last round's bonus token: the drafts' step after y_g
            ids = draft_pending[:, :1]
            logits = self.drafts(ids, mask[:, :-1] if padded else None, draft_cache,
                                 position_ids=position_ids_from_mask(mask[:, :-1], 1), logits_to_keep=1)
            forwards["draft"] += 1
            scores.append(uncertainty(logits, deferred[:, None]))
        stats = DecodingStats(speculative_tokens, tuple(proposed), tuple(accepted), len(proposed),
                              forwards["draft"], forwards["reference"])
        if not tokens:
            empty = input_ids.new_empty(B, 0)
            u = None
            if with_uncertainty:
                nan = torch.full((B, 0), float("nan"), device=device)
                u = DraftUncertainty(*([nan] * 6), draft_lse=nan.expand(K, B, 0), target_lse=nan)
            return GenerationResult(input_ids, u, empty.bool(), stats)
        generated = torch.cat(tokens, dim=1)
        generated_mask = torch.cat(live, dim=1)
        u = None
        if with_uncertainty:
            u = nan_where_not(DraftUncertainty(*(torch.cat(field, dim=-1) for field in zip(*scores))), generated_mask)
        return GenerationResult(torch.cat([input_ids, generated], dim=1), u, generated_mask, stats)

    def _propose(self, draft_pending: Tensor, grown: Optional[Tensor], positions: Tensor, n: int, g: int, steps: int,
                 with_deferred: bool, cache, proposer: Callable[[Tensor], Tensor], do_sample: bool,
                 generator: Optional[torch.Generator], stop_below: float, finished: Tensor) -> tuple[list, list, list]:
        """``steps`` batched draft steps of a round; step j consumes ``draft_pending`` (j = 0) or
        ``y_j`` and, for j < g, proposes ``y_{j+1}``; the steps end after a proposal with
        ``q(y) < stop_below`` in a row not ``finished`` (fewer than g proposals then).

        ``grown`` is the round's attention mask, or None when the batch has no padding.
        Returns the draft logits ``[K, B, V]`` at each position (first, with ``with_deferred``, the
        one after the previous round's last proposal), the proposal distributions ``[B, V']`` and
        the proposals ``[B]``.
        """
        rows, q, ys = [], [], []
        for j in range(steps):
            ids = draft_pending if j == 0 else ys[-1][:, None]
            keep = 2 if j == 0 and with_deferred else 1
            logits = self.drafts(ids, None if grown is None else grown[:, :n + j], cache,
                                 position_ids=positions[:, n + j - ids.shape[1]:n + j], logits_to_keep=keep)
            rows.extend(logits.unbind(2))
            if j < g:
                q.append(proposer(rows[-1]))
                ys.append(propose(q[-1], do_sample, generator))
                if stop_below and j + 1 < g:
                    confidence = q[-1].gather(1, ys[-1][:, None]).squeeze(1)
                    if bool(((confidence < stop_below) & ~finished).any()):
                        break
        return rows, q, ys

    def _scorer(self, device: torch.device) -> DraftUncertaintyScorer:
        """The estimator's :func:`epikern.draft_uncertainty` settings, checked once per call of
        :meth:`score` or :meth:`generate` (on the vocabulary the drafts and the reference share)."""
        vocab = (self.drafts.vocab_size, model_vocab_size(self._reference))
        return DraftUncertaintyScorer(
            self.drafts.num_drafts, device, weights=self.weights, temperature=self.eu_temperature,
            decompose=self.decompose, backend=self.backend, vocab_size=None if vocab[0] == vocab[1] else min(vocab))


def _accept(y: Tensor, q: list, logits: Tensor, finished: Tensor, eos: Optional[Tensor], do_sample: bool,
            temperature: float, generator: Optional[torch.Generator]) -> tuple[int, Tensor]:
    """Verify a round: the batch's accepted count n and its emitted tokens ``[B, n + 1]``.

    ``y [B, g]`` proposals drawn from ``q`` (g tensors ``[B, V']``), ``logits [B, g + 1, V]`` the
    target's. A row that has finished, or whose eos lies within its accepted tokens, does not limit
    n (its later tokens are padding anyway). Reads n on the host (the one read of a round).
    """
    g = y.shape[1]
    if do_sample:
        p = torch.softmax(logits.float() / temperature, dim=-1)
        accepted = sampling_accepted(y, torch.stack(q, dim=1), p, generator) if g else None
    else:
        target_tokens = logits.argmax(dim=-1)
        accepted = greedy_accepted(y, target_tokens) if g else None
    cut = 0
    if g:
        if eos is not None:
            stream = y if do_sample else target_tokens  # the tokens a row emits if it is not cut
            within = torch.arange(stream.shape[1], device=y.device) < (accepted + (not do_sample))[:, None]
            accepted = torch.where(finished | (torch.isin(stream, eos) & within).any(1), g, accepted)
        cut = int(accepted.min())
    if not do_sample:
        return cut, target_tokens[:, :cut + 1]
    last = last_token_of_round(y, accepted, cut, p[:, cut], q[cut] if cut < g else None, generator)
    return cut, torch.cat([y[:, :cut], last[:, None]], dim=1)


def _stop_at_eos(new: Tensor, finished: Tensor, eos: Optional[Tensor], pad: Optional[int]):
    """A round's tokens ``[B, n]`` after eos: ``(tokens, alive, finished, done)``.

    ``alive [B, n]`` marks the tokens up to and including each row's first eos (none for a row
    finished before the round); later tokens become ``pad``. When every row has finished, ``done``
    is True and the columns after the last eos are dropped, as plain decoding stops there. Without
    eos nothing changes (and nothing is read from the device); with eos this is one read.
    """
    alive = (~finished)[:, None].expand_as(new)
    if eos is None:
        return new, alive, finished, False
    is_eos = torch.isin(new, eos)
    alive = alive & ~((is_eos.cumsum(1) - is_eos.long()) > 0)  # no earlier eos this round
    finished = finished | (is_eos & alive).any(1)
    width, done = torch.stack([alive.any(0).sum(), finished.all()]).tolist()
    return new.masked_fill(~alive, pad)[:, :width], alive[:, :width], finished, bool(done)


def nan_where_not(u: NamedTuple, keep: Tensor) -> NamedTuple:
    """Set every field of a NamedTuple of ``[..., B, T]`` tensors (DraftUncertainty,
    EnsembleUncertainty) to NaN where ``keep [B, T]`` is False."""
    return type(u)(*(f.masked_fill(~keep, float("nan")) for f in u))


def lm_logits(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor], position_ids: Tensor,
               cache: Optional[DynamicCache], logits_to_keep: int) -> Tensor:
    """``[B, T', V]`` logits of an HF causal LM, with generate's explicit ``position_ids``.

    A forward of T > 1 tokens after a non-empty cache (a speculative verification) gets its boolean
    ``[B, 1, T, past + T]`` mask built here (:func:`~epikern.models.masks.causal_mask`) where HF's
    own would be the same plain causal-and-padding mask (:func:`builds_plain_causal_mask`): HF uses a
    4-D mask as given and skips ``create_causal_mask``, which is 0.14 ms of a 1.97 ms 3-token
    verification of the tiny target; the logits are bit-identical (tested).
    """
    T = input_ids.shape[1]
    if T > 1 and cache is not None and attention_mask is not None and attention_mask.dim() == 2 \
            and builds_plain_causal_mask(model.config):
        past = cache.get_seq_length()
        if past:
            attention_mask = causal_mask(attention_mask, input_ids.shape[0], T, past, None, input_ids.device)[0]
    kwargs = {hf_cache_keyword(type(model)): cache, "use_cache": cache is not None}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=logits_to_keep, **kwargs)
    return out.logits


#: Model types whose decoder layers all take ``create_causal_mask``'s mask (no per-layer kinds of their own).
_PLAIN_MASK_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def builds_plain_causal_mask(config) -> bool:
    """Whether HF gives every layer of this model the plain causal ∧ padding boolean mask: SDPA
    attention, a Llama-family type, and no sliding-window layer (``layer_types``, else
    ``sliding_window``)."""
    if getattr(config, "_attn_implementation", None) != "sdpa" \
            or getattr(config, "model_type", None) not in _PLAIN_MASK_TYPES:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None


@functools.lru_cache(maxsize=None)
def hf_cache_keyword(model_type: type) -> str:
    """The cache argument of ``model_type.forward``: ``cache`` in recent transformers 5.x releases,
    ``past_key_values`` in earlier ones."""
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"
