"""Oracle drafts: K members of the ground truth's own perturbation family, scored as drafts.

The draft method's ceiling and a test of its whole scoring path. The K "drafts" are the K
perturbed members of TokUR's ensemble ``TokUR(target, num_samples=K + 1, seed=s)`` (TokUR's noise,
design §5, with a seed of their own), the reference is the clean target, and the score is the same
:func:`epikern.draft_uncertainty` call the trained drafts go through:

    eu  = (1/K) Σ_k KL(q_k ‖ p)        q_k = member k,  p = the clean target
    jsd = H(q̄) − (1/K) Σ_k H(q_k)      the mutual information of the K members alone
    kl  = KL(q̄ ‖ p)

For small perturbations with δ_k the members' logit offsets (mean zero, i.i.d.) and F the
Fisher metric at p, ``eu ≈ ½ E‖δ‖²_F`` whatever K, while TokUR's mutual information over M
members of which one is clean is ``≈ ½ E‖δ‖²_F · (M − 1)² / M²`` (0.81× at M = 10, 0.94× at the
ground truth's M = 32): the oracle measures the family's spread around the clean model without
the finite-M shrinkage, so its RMSE to the ground truth is expected near TokUR's, not at zero.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..models.masks import nan_where_not
from ..models.tokur import TokUR
from ..ops import DraftUncertainty, draft_uncertainty
from ..ops.draft_uncertainty import draft_uncertainty_flops
from .cost import lm_flops_per_token
from .estimators import Estimator

__all__ = ["OracleDrafts", "oracle_method"]


class OracleDrafts:
    """The K perturbed members of ``members`` (a :class:`~epikern.TokUR` with M = K + 1) as K drafts.

    Args:
        members: TokUR's ensemble whose ``num_samples − 1`` perturbed members are the drafts (its
            seed picks them: give it a seed of its own, e.g. ``tokur.with_samples(K + 1, seed=2)``).
        backend: backend of :func:`epikern.draft_uncertainty`.
    """

    def __init__(self, members: TokUR, backend: Optional[str] = None):
        if not isinstance(members, TokUR):
            raise TypeError(f"members must be a TokUR ensemble, got {type(members).__name__}")
        self.members, self.backend = members, backend

    @property
    def num_drafts(self) -> int:
        """K = M − 1."""
        return self.members.num_samples - 1

    @torch.no_grad()
    def score(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> DraftUncertainty:
        """Per-token :class:`~epikern.DraftUncertainty` (fields ``[B, T]``) of a given sequence.

        The members see the same noise as ``members.score`` of the same sequence (one draw per
        column, :meth:`TokUR.noise`), all T positions at once; rows go in groups so that at most
        ``members.max_chunk_logits`` logits exist at a time. Position t scores the next-token
        distribution after token t; padding positions are NaN.
        """
        B, T = input_ids.shape
        M, V = self.members.num_samples, self.members.target.config.vocab_size
        noise = self.members.noise(0, T, B, input_ids.device)  # [L, 2, K, B, T, r]
        rows = max(1, self.members.max_chunk_logits // (M * T * V))
        parts = []
        for b in range(0, B, rows):
            part = slice(b, b + rows)
            mask = None if attention_mask is None else attention_mask[part]
            logits = self.members.perturbation.member_logits(input_ids[part], mask, num_members=M,
                                                             noise=noise[:, :, :, part])
            parts.append(draft_uncertainty(logits[1:], logits[0], backend=self.backend))
        # fields are [rows, T]; draft_lse is [K, rows, T]
        u = DraftUncertainty(*(torch.cat(field, dim=field[0].dim() - 2) for field in zip(*parts)))
        return u if attention_mask is None else nan_where_not(u, attention_mask.bool())


def oracle_method(name: str, members: TokUR) -> Estimator:
    """``eu`` of the oracle drafts as a benchmark :class:`~epikern.eval.estimators.Estimator`: K + 1
    target forwards per token (the clean one generates it) and one ``draft_uncertainty`` call."""
    oracle = OracleDrafts(members)
    K, target = oracle.num_drafts, members.target

    def extra(c: float) -> float:
        return K * lm_flops_per_token(target, c) + draft_uncertainty_flops(K, 1, target.config.vocab_size, True, True)

    return Estimator(name, lambda ids, mask, start=0: oracle.score(ids, mask).eu,
                     lambda c: lm_flops_per_token(target, c) + extra(c), extra, True,
                     f"oracle drafts: K={K} members of TokUR's perturbation (sigma {members.perturbation.sigma}, "
                     f"seed {members.seed}) against the clean target, eu = jsd + kl",
                     lambda ids, mask, start=0: oracle.score(ids, mask))
