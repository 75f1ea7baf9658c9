"""``ek.DraftEstimator``: per-token epistemic uncertainty of a target LM from a DraftEnsemble.

Alignment (both methods): the value at token position t scores the **next-token distribution after
token t**, i.e. the distributions that predict token t + 1. In :meth:`DraftEstimator.generate`
column j scores the distribution from which generated token j was chosen, so for a prompt of length
T0, ``generate(...).uncertainty[:, j]`` equals ``score(sequences)[:, T0 - 1 + j]``.
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from ..ops import DraftUncertainty, draft_uncertainty
from .draft_ensemble import DraftEnsemble
from .masks import position_ids_from_mask


class GenerationResult(NamedTuple):
    """What :meth:`DraftEstimator.generate` returns (N ≤ ``max_new_tokens`` generated tokens)."""

    sequences: Tensor  #: [B, T0 + N] prompt then generated ids (pad after a row's eos)
    uncertainty: DraftUncertainty  #: fields [B, N] (draft_lse [K, B, N]); NaN after a row's eos
    generated_mask: Tensor  #: [B, N] bool, True for generated tokens up to and including eos


class DraftEstimator:
    """Token-level EU of ``target`` from K drafts, against the target or an OSD proxy (SPEC §1).

    Args:
        target: HF causal LM that generates the text.
        drafts: the :class:`DraftEnsemble` (same tokenizer; a padded vocabulary is compared on the
            shared prefix).
        reference: the distribution p of ``kl``/``eu``: None for the target itself, or a proxy HF
            causal LM (``p_mix`` trained by OSD).
        weights, eu_temperature, decompose, backend: passed to :func:`epikern.draft_uncertainty`
            (``eu_temperature`` scales every distribution of the uncertainty, not the sampling).
    """

    def __init__(self, target: nn.Module, drafts: DraftEnsemble, reference: Optional[nn.Module] = None, *,
                 weights: Union[None, Sequence[float], Tensor] = None, eu_temperature: float = 1.0,
                 decompose: bool = True, backend: Optional[str] = None):
        if not isinstance(drafts, DraftEnsemble):
            raise TypeError(f"drafts must be a DraftEnsemble, got {type(drafts).__name__}")
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
        parts = []
        for start in range(0, T, step):
            ids, pos = input_ids[:, start:start + step], positions[:, start:start + step]
            mask = None if attention_mask is None else attention_mask[:, :start + step]
            ref = _lm_logits(self._reference, ids, mask, pos, ref_cache, 0)
            parts.append(self._uncertainty(self.drafts(ids, mask, draft_cache, position_ids=pos), ref))
        u = DraftUncertainty(*(torch.cat(field, dim=-1) for field in zip(*parts)))
        return u if attention_mask is None else _nan_where_not(u, attention_mask.bool())

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0,
                 eos_token_id: Union[None, int, Sequence[int]] = None,
                 generator: Optional[torch.Generator] = None) -> GenerationResult:
        """Decode with the target while the drafts advance in lockstep on their shared cache.

        Each step runs the target (its own ``DynamicCache``), the reference if it is a proxy, one
        batched step of all K drafts, and one fused :func:`epikern.draft_uncertainty` call on the
        last position. The only host synchronisation beyond the models' is the all-rows-finished
        check, made only when ``eos_token_id`` is given.

        Args:
            input_ids: ``[B, T0]`` prompts, left-padded if their lengths differ.
            attention_mask: ``[B, T0]`` (0 = padding) or None.
            max_new_tokens: N ≥ 0.
            do_sample: sample from ``softmax(target_logits / temperature)``; else greedy (argmax).
            temperature: sampling temperature (> 0), used only with ``do_sample``.
            eos_token_id: id(s) ending a row; later tokens of that row are the target's
                ``pad_token_id`` (or the first eos id) and their uncertainty is NaN.
            generator: random generator for sampling.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        B, T0 = input_ids.shape
        device = input_ids.device
        mask = torch.ones(B, T0, dtype=torch.long, device=device) if attention_mask is None else attention_mask
        positions = position_ids_from_mask(mask, T0)
        eos = None if eos_token_id is None else torch.as_tensor(eos_token_id, device=device).flatten()
        pad = getattr(self.target.config, "pad_token_id", None)
        pad = int(eos[0]) if pad is None and eos is not None else pad
        target_cache = DynamicCache(config=self.target.config)
        ref_cache = None if self.reference is None else DynamicCache(config=self.reference.config)
        draft_cache = self.drafts.new_cache(B)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        step_ids, tokens, live, steps = input_ids, [], [], []
        for _ in range(max_new_tokens):
            logits = _lm_logits(self.target, step_ids, mask, positions, target_cache, 1)[:, -1]
            ref = logits if self.reference is None else \
                _lm_logits(self.reference, step_ids, mask, positions, ref_cache, 1)[:, -1]
            drafts = self.drafts(step_ids, mask, draft_cache, position_ids=positions, logits_to_keep=1)[:, :, -1]
            steps.append(self._uncertainty(drafts, ref))
            if do_sample:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(dim=-1)
            live.append(~finished)
            if eos is not None:
                nxt = nxt.masked_fill(finished, pad)
                finished = finished | torch.isin(nxt, eos)
            tokens.append(nxt)
            if eos is not None and bool(finished.all()):
                break
            step_ids = nxt[:, None]
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            positions = positions[:, -1:] + 1
        if not steps:
            empty = input_ids.new_empty(B, 0)
            nan = torch.full((B, 0), float("nan"), device=device)
            u = DraftUncertainty(*([nan] * 6), draft_lse=nan.expand(self.drafts.num_drafts, B, 0), target_lse=nan)
            return GenerationResult(input_ids, u, empty.bool())
        generated = torch.stack(tokens, dim=1)
        generated_mask = torch.stack(live, dim=1)
        u = DraftUncertainty(*(torch.stack(field, dim=-1) for field in zip(*steps)))
        return GenerationResult(torch.cat([input_ids, generated], dim=1), _nan_where_not(u, generated_mask),
                                generated_mask)

    def _uncertainty(self, draft_logits: Tensor, ref_logits: Tensor) -> DraftUncertainty:
        vocab = min(draft_logits.shape[-1], ref_logits.shape[-1])
        return draft_uncertainty(
            draft_logits, ref_logits, weights=self.weights, temperature=self.eu_temperature,
            decompose=self.decompose, backend=self.backend,
            vocab_size=None if draft_logits.shape[-1] == ref_logits.shape[-1] else vocab,
        )


def _nan_where_not(u: DraftUncertainty, keep: Tensor) -> DraftUncertainty:
    """Set every field to NaN where ``keep [B, T]`` is False."""
    return DraftUncertainty(*(f.masked_fill(~keep, float("nan")) for f in u))


def _lm_logits(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor], position_ids: Tensor,
               cache: Optional[DynamicCache], logits_to_keep: int) -> Tensor:
    """``[B, T', V]`` logits of an HF causal LM, with generate's explicit ``position_ids``."""
    kwargs = {hf_cache_keyword(type(model)): cache, "use_cache": cache is not None}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=logits_to_keep, **kwargs)
    return out.logits


@functools.lru_cache(maxsize=None)
def hf_cache_keyword(model_type: type) -> str:
    """The cache argument of ``model_type.forward``: ``cache`` in recent transformers 5.x releases,
    ``past_key_values`` in earlier ones."""
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"
