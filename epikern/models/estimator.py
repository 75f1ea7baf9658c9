"""``ek.DraftEstimator``: per-token epistemic uncertainty of a target LM from a DraftEnsemble.

Alignment (both methods): the value at token position t scores the **next-token distribution after
token t**, i.e. the distributions that predict token t + 1. In :meth:`DraftEstimator.generate`
column j scores the distribution from which generated token j was chosen, so for a prompt of length
T0, ``generate(...).uncertainty[:, j]`` equals ``score(sequences)[:, T0 - 1 + j]``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from ..ops import DraftUncertainty, DraftUncertaintyScorer
from ..ops._checks import uniform_or_checked_weights
from .decoding import DecodingStats, DraftDecoder, Proposer, Sampler, Transcript, accept, prepare, stop_at_eos
from .draft_ensemble import DraftEnsemble
from .hf import lm_logits
from .loading import model_vocab_size
from .masks import nan_where_not, position_ids_from_mask
from .speculative import MIXTURE, check_proposal


class GenerationResult(NamedTuple):
    """What :meth:`DraftEstimator.generate` returns (N ≤ ``max_new_tokens`` generated tokens)."""

    sequences: Tensor  #: [B, T0 + N] prompt then generated ids (pad after a row's eos)
    #: fields [B, N] (draft_lse [K, B, N]); NaN after a row's eos; None with ``with_uncertainty=False``
    uncertainty: Optional[DraftUncertainty]
    generated_mask: Tensor  #: [B, N] bool, True for generated tokens up to and including eos
    stats: Optional[DecodingStats] = None  #: rounds, acceptance and forwards of each model


class DraftEstimator:
    """Token-level EU of ``target`` from K drafts, against the target or an OSD proxy (design §1).

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
        uncertainty = self.scorer(input_ids.device)
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
                 eos_token_id: Union[None, int, Sequence[int]] = None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, speculative_tokens: int = 0,
                 proposal: Union[str, int] = MIXTURE, confidence_threshold: float = 0.0,
                 with_uncertainty: bool = True) -> GenerationResult:
        """Decode with the target, speculatively with the drafts' proposals when ``speculative_tokens`` > 0.

        By rounds of :mod:`epikern.models.decoding` (design §4b): the K drafts propose g ≤ γ tokens (from
        ``q̄ = Σ_k w_k softmax(z_k / T)``, the estimator's ``weights``, T = ``temperature`` when sampling
        and 1 when greedy, or from draft ``proposal`` alone), the target verifies them in one forward and
        accepts its argmax run (greedy) or by speculative sampling, so the output is the target's greedy
        output or distributed exactly as the target's; one fused :func:`epikern.draft_uncertainty` call
        scores the round's tokens (equal to plain decoding's up to float round-off) and the caches are
        rolled back with ``crop``. γ = 0 is plain decoding: one target, proxy and draft step a token.

        Args:
            input_ids: ``[B, T0]`` prompts, left-padded if their lengths differ.
            attention_mask: ``[B, T0]`` (0 = padding) or None.
            max_new_tokens: N ≥ 0.
            do_sample: sample from ``softmax(target_logits / temperature)``; else greedy (argmax).
            temperature: sampling temperature (> 0), used only with ``do_sample``.
            eos_token_id: id(s) ending a row; later tokens of that row are ``pad_token_id`` (default:
                the target's, else the first eos id) and their uncertainty is NaN.
            generator: random generator for sampling (proposals, acceptance and target samples).
            speculative_tokens: γ ≥ 0 proposals per round (0: plain decoding).
            proposal: ``"mixture"`` or a draft index k in ``[0, K)``.
            confidence_threshold: τ in [0, 1]: end a round's proposals after one with q(y) < τ.
            with_uncertainty: False skips the uncertainty (and the proxy, and at γ = 0 the drafts).

        Returns:
            :class:`GenerationResult`; its ``stats`` count rounds, acceptance and forwards.

        Raises:
            ValueError: negative ``max_new_tokens`` or γ, ``proposal`` out of range, τ outside
                [0, 1], sampling with a non-positive temperature. TypeError: a non-integer γ.
        """
        batch = prepare(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, self.target.config)
        sampler = Sampler(do_sample, temperature, generator)
        proposer = self._proposer(speculative_tokens, proposal, confidence_threshold, sampler, input_ids.device)
        decoder = DraftDecoder(self.target, self.drafts, self.reference if with_uncertainty else None, proposer,
                               self.scorer(input_ids.device) if with_uncertainty else None, batch.has_padding)
        state, transcript = decoder.start(batch), Transcript()
        while state.emitted < max_new_tokens:
            window = state.window(min(speculative_tokens, max_new_tokens - state.emitted - 1))
            drafted, window = decoder.propose(state, window)
            logits, ref = decoder.verify(state, window, drafted)
            cut, new = accept(drafted, logits, state.finished, batch.eos, sampler)
            emitted = stop_at_eos(new, state.finished, batch.eos, batch.pad)
            score, state.deferred = decoder.score(state, window, drafted, ref, emitted.tokens.shape[1])
            transcript.add(emitted, score)
            state.advance(window, emitted)
            decoder.rollback(state, window, drafted, cut)
            if emitted.done:
                break
        transcript.add_score(decoder.score_last(state))
        sequences, generated_mask, u = transcript.finish(input_ids, decoder.empty_score(input_ids))
        return GenerationResult(sequences, u, generated_mask, decoder.stats(state))

    def _proposer(self, speculative_tokens: int, proposal: Union[str, int], confidence_threshold: float,
                  sampler: Sampler, device: torch.device) -> Proposer:
        """The round's proposal rule; proposals come from the vocabulary the drafts and the target share."""
        K = self.drafts.num_drafts
        draft = check_proposal(proposal, K)
        weights = None if draft is not None else uniform_or_checked_weights(self.weights, K, device)
        vocab = min(self.drafts.vocab_size, model_vocab_size(self.target))
        return Proposer(speculative_tokens, draft, weights, vocab, sampler, confidence_threshold)

    def scorer(self, device: torch.device) -> DraftUncertaintyScorer:
        """The estimator's :func:`epikern.draft_uncertainty` settings, checked once per call of
        :meth:`score` or :meth:`generate` (on the vocabulary the drafts and the reference share);
        a benchmark may wrap it on an instance to time every EU call in situ."""
        vocab = (self.drafts.vocab_size, model_vocab_size(self._reference))
        return DraftUncertaintyScorer(
            self.drafts.num_drafts, device, weights=self.weights, temperature=self.eu_temperature,
            decompose=self.decompose, backend=self.backend, vocab_size=None if vocab[0] == vocab[1] else min(vocab))
