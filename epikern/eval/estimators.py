"""Token-level uncertainty estimators behind one interface, for the benchmark (design §6).

An :class:`Estimator` scores a batch of whole sequences (teacher forcing): ``score(input_ids,
attention_mask, start) -> [B, T]`` float32, where position t scores the next-token distribution after
token t (positions before ``start`` may be left NaN: they are not needed) (the alignment of :class:`~epikern.models.DraftEstimator` and :class:`~epikern.TokUR`), so
the score of generated token j of a response whose prompt has T0 columns sits at ``T0 − 1 + j``
(:func:`response_scores`). Every score is an *uncertainty*: higher means less trustworthy.

Methods (the names of ``report.json``):

| name | score per token | reference p |
|---|---|---|
| ``drafts_*`` | ``eu = jsd + kl`` of the K drafts (:func:`epikern.draft_uncertainty`) | the target, or the OSD proxy |
| ``single_draft`` | the same with K = 1, so ``eu = kl`` | the target |
| ``tokur`` / ground truth | mutual information of the perturbation ensemble (M members) | — |
| ``entropy`` | ``H(p_target)`` | — |
| ``maxprob`` | ``1 − max_v p_target(v)`` | — |
| ``loglik`` | ``−log p_target(next token)`` (the sequence mean is the negated mean log-likelihood) | — |
| ``length`` | 1 per generated token (its sum is the response length: long chains fail more often) | — |
| ``oracle_drafts`` | ``eu`` of K perturbed target members as drafts (:mod:`epikern.eval.oracle`) | the clean target |

FLOPs per generated token (:attr:`Estimator.flops_per_token`, one multiply-add = 2 FLOPs, analytic
at the mean decode context) are the *whole* inference cost of producing the token and its score:
the target forward that generates it, plus the drafts (and the proxy) and the uncertainty op for
the draft methods, plus M − 1 perturbed target forwards for TokUR. ``extra_flops_per_token`` is the
part beyond plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..models.draft_ensemble import DraftEnsemble
from ..models.estimator import DraftEstimator
from ..models.hf import lm_logits
from ..models.masks import position_ids_from_mask
from ..models.tokur import TokUR
from ..ops import DraftUncertainty
from ..ops.draft_uncertainty import draft_uncertainty_flops
from .cost import draft_ensemble_flops_per_token, lm_flops_per_token

__all__ = ["Estimator", "draft_method", "tokur_method", "target_baselines", "length_baseline", "response_scores"]


@dataclass
class Estimator:
    """One method: a scorer and its analytic cost.

    Attributes:
        name: the method's key in the report.
        score: ``(input_ids [B, T], attention_mask [B, T], start) -> [B, T]`` per-position
            uncertainty, defined at least from position ``start`` on.
        flops_per_token: ``context -> FLOPs`` per generated token at mean decode context ``context``.
        extra_flops_per_token: the same beyond the target's own forward (plain decoding).
        is_eu: an epistemic-uncertainty estimate (its RMSE to the ground truth is meaningful).
        description: one line for the report.
        terms: for the draft methods, the same call as ``score`` returning the whole
            :class:`~epikern.DraftUncertainty` (``eu`` is ``score``; ``jsd`` and ``kl`` are the terms of
            the calibrated RMSE); None for the others.
    """

    name: str
    score: Callable[[Tensor, Tensor, int], Tensor]
    flops_per_token: Callable[[float], float]
    extra_flops_per_token: Callable[[float], float]
    is_eu: bool
    description: str
    terms: Optional[Callable[[Tensor, Tensor, int], DraftUncertainty]] = None


def draft_method(name: str, target: nn.Module, drafts: DraftEnsemble, reference: Optional[nn.Module] = None,
                 *, backend: Optional[str] = None) -> Estimator:
    """``eu`` of ``drafts`` against ``reference`` (None: the target itself)."""
    est = DraftEstimator(target, drafts, reference, backend=backend)
    K, V = drafts.num_drafts, drafts.vocab_size

    def extra(c: float) -> float:
        ref = 0.0 if reference is None else lm_flops_per_token(reference, c)
        return draft_ensemble_flops_per_token(drafts, c) + ref + draft_uncertainty_flops(K, 1, V, True, True)

    against = "the target" if reference is None else "the OSD proxy"
    return Estimator(name, lambda ids, mask, start=0: est.score(ids, mask).eu,
                     lambda c: lm_flops_per_token(target, c) + extra(c), extra, True,
                     f"K={K} drafts (S={drafts.shared_layers} shared layers), eu = jsd + kl against {against}",
                     lambda ids, mask, start=0: est.score(ids, mask))


def tokur_method(name: str, tokur: TokUR) -> Estimator:
    """Mutual information of TokUR's M-member perturbation ensemble (clean pass included)."""
    M = tokur.num_samples
    V = tokur.target.config.vocab_size

    def extra(c: float) -> float:
        return (M - 1) * lm_flops_per_token(tokur.target, c) + draft_uncertainty_flops(M, 1, V, False, True)

    return Estimator(name, lambda ids, mask, start=0: tokur.score(ids, mask, start=start).epistemic,
                     lambda c: lm_flops_per_token(tokur.target, c) + extra(c), extra, True,
                     f"TokUR, M={M} members (one clean), rank {tokur.perturbation.rank}, "
                     f"sigma {tokur.perturbation.sigma}: mutual information")


def _target_log_probs(target: nn.Module, ids: Tensor, mask: Optional[Tensor]) -> Tensor:
    positions = position_ids_from_mask(mask, ids.shape[1]) if mask is not None else None
    if positions is None:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    with torch.no_grad():
        return torch.log_softmax(lm_logits(target, ids, mask, positions, None, 0).float(), dim=-1)


def _entropy(log_p: Tensor, ids: Tensor) -> Tensor:
    return -(log_p.exp() * log_p).nan_to_num(0.0).sum(-1)  # 0·log 0 = 0 for −inf logits


def _maxprob(log_p: Tensor, ids: Tensor) -> Tensor:
    return 1.0 - log_p.max(-1).values.exp()


def _loglik(log_p: Tensor, ids: Tensor) -> Tensor:
    nxt = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)  # the last position has no next token
    out = -log_p.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
    out[:, -1] = float("nan")
    return out


def target_baselines(target: nn.Module) -> list[Estimator]:
    """``entropy``, ``maxprob`` and ``loglik`` of the target's own next-token distribution."""
    out = []
    for name, fn, what in (("entropy", _entropy, "target predictive entropy H(p)"),
                           ("maxprob", _maxprob, "1 − max_v p(v) of the target"),
                           ("loglik", _loglik, "−log p(next token) of the target")):
        def score(ids, mask, start=0, fn=fn):
            u = fn(_target_log_probs(target, ids, mask), ids)
            return u if mask is None else u.masked_fill(~mask.bool(), float("nan"))

        out.append(Estimator(name, score, lambda c: lm_flops_per_token(target, c), lambda c: 0.0, False, what))
    return out


def length_baseline(target: nn.Module) -> Estimator:
    """``length``: a score of 1 at every real position, so a response's summed score is its length
    and its mean, max and quantiles are constant (the baseline that needs no model at all)."""

    def score(ids, mask, start=0):
        ones = torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
        return ones if mask is None else ones.masked_fill(~mask.bool(), float("nan"))

    return Estimator("length", score, lambda c: lm_flops_per_token(target, c), lambda c: 0.0, False,
                     "response length: 1 per generated token")


def response_scores(scores: Tensor, prompt_len: int, generated_mask: Tensor) -> list[np.ndarray]:
    """Per-response score arrays of the generated tokens.

    Args:
        scores: ``[B, T0 + N]`` per-position scores of the prompt (``T0`` columns, left-padded) and
            the response.
        prompt_len: T0.
        generated_mask: ``[B, N]`` True for the tokens of a response (up to and including eos).

    Returns:
        B float64 arrays; array b holds ``scores[b, T0 − 1 + j]`` for the generated tokens j of row b.
    """
    N = generated_mask.shape[1]
    window = scores[:, prompt_len - 1: prompt_len - 1 + N].double().cpu().numpy()
    keep = generated_mask.cpu().numpy()
    return [window[b][keep[b]] for b in range(window.shape[0])]
