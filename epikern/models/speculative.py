"""The proposal and verification math of speculative decoding (design §4b), on tensors, without models.

One round, for a batch of B rows: the drafts' proposal distributions ``q_0 .. q_{g-1}`` (``[B, V]``
each; ``q_j`` predicts token j of the round) give proposals ``y_1 .. y_g``; the target's
distributions ``p_0 .. p_g`` come from one forward over the round. Row b accepts a leading run of
``n_b`` proposals and then takes one more token from the target, so a round emits ``n_b + 1``
tokens:

* greedy: accept ``y_{j+1}`` while it equals ``argmax p_j``; the next token is ``argmax p_{n_b}``;
* sampling (Leviathan et al. 2023, Chen et al. 2023): accept ``y_{j+1}`` with probability
  ``min(1, p_j(y_{j+1}) / q_j(y_{j+1}))``; after a rejection at j draw from
  ``norm(max(0, p_j − q_j))``; after g acceptances draw a bonus token from ``p_g``. Every emitted
  token is then distributed exactly as the target's ``p`` given its prefix, whatever q is.

Probabilities are float32; the mixture proposal is ``q̄ = Σ_k w_k softmax(z_k / T)``, summed in
linear space as the fused EU kernel sums it (the terms are normalised probabilities: no overflow,
no cancellation; only an entry below float32's range, < 1e-38, rounds to 0 — as it would on leaving
log space), and the acceptance ratio, the residual and the proposal sample all use that same tensor.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

#: ``proposal=`` value that proposes from the weighted draft mixture q̄.
MIXTURE = "mixture"


def check_proposal(proposal: Union[str, int], num_drafts: int) -> Optional[int]:
    """The draft index that proposes, or None for the mixture; raises on anything else."""
    if isinstance(proposal, str) and proposal == MIXTURE:
        return None
    if isinstance(proposal, int) and not isinstance(proposal, bool) and 0 <= proposal < num_drafts:
        return proposal
    raise ValueError(f"proposal must be {MIXTURE!r} or a draft index in [0, {num_drafts}) "
                     f"(K = {num_drafts} drafts), got {proposal!r}")


def proposal_probs(draft_logits: Tensor, weights: Optional[Tensor], draft: Optional[int],
                   temperature: float) -> Tensor:
    """Proposal distribution ``[B, V]`` (float32) of one draft step.

    Args:
        draft_logits: ``[K, B, V]`` logits of the K drafts at one position.
        weights: ``[K]`` float32 mixture weights ``w_k`` (used when ``draft`` is None).
        draft: propose from draft ``draft`` alone, or None for the mixture ``q̄ = Σ_k w_k q_k``.
        temperature: T of ``q_k = softmax(z_k / T)``.
    """
    z = draft_logits.float() if temperature == 1 else draft_logits.float() / temperature
    if draft is not None:
        return torch.softmax(z[draft], dim=-1)
    K, B, V = z.shape
    return (weights @ torch.softmax(z, dim=-1).reshape(K, B * V)).view(B, V)  # one matrix-vector product


def propose(q: Tensor, do_sample: bool, generator: Optional[torch.Generator]) -> Tensor:
    """One proposed token per row ``[B]``: ``argmax q`` (greedy) or a sample from ``q [B, V]``."""
    if do_sample:
        return torch.multinomial(q, 1, generator=generator).squeeze(1)
    return q.argmax(dim=-1)


def leading_run(accepted: Tensor) -> Tensor:
    """``[B]`` length of the leading run of True in ``accepted [B, g]`` (0 if the first is False)."""
    return accepted.long().cumprod(dim=-1).sum(dim=-1)


def greedy_accepted(proposals: Tensor, target_tokens: Tensor) -> Tensor:
    """Accepted proposals per row ``[B]``: ``proposals [B, g]`` against ``target_tokens [B, g + 1]``
    (the target's argmax at each position of the round)."""
    return leading_run(proposals == target_tokens[:, : proposals.shape[1]])


def sampling_accepted(proposals: Tensor, q: Tensor, p: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Accepted proposals per row ``[B]`` under speculative sampling.

    Args:
        proposals: ``[B, g]`` the sampled ``y_1 .. y_g``.
        q: ``[B, g, Vq]`` the proposal distributions they were sampled from (``Vq ≤ V``: a draft
            vocabulary shorter than the target's proposes only its own tokens).
        p: ``[B, g + 1, V]`` the target's distributions.

    ``y_{j+1}`` is accepted when ``u_j · q_j(y) < p_j(y)`` with ``u_j ~ U[0, 1)``, i.e. with
    probability ``min(1, p_j(y) / q_j(y))`` (no division: ``q_j(y) > 0`` for a sampled y).
    """
    g = proposals.shape[1]
    index = proposals.unsqueeze(-1)
    p_y = p[:, :g].gather(-1, index).squeeze(-1)
    q_y = q.gather(-1, index).squeeze(-1)
    u = torch.rand(p_y.shape, generator=generator, device=p_y.device, dtype=p_y.dtype)
    return leading_run(u * q_y < p_y)


def residual_probs(p: Tensor, q: Optional[Tensor]) -> Tensor:
    """What to sample after a rejection: ``max(0, p − q)`` (unnormalised, ``[B, V]``), or ``p`` itself
    without a proposal (the bonus token).

    ``q [B, Vq]`` may be shorter than ``p`` (zeros beyond Vq). Where rounding makes the residual
    vanish (``p ≤ q`` everywhere, i.e. ``p = q`` up to round-off, where a rejection has probability
    ~0), the row falls back to ``p``.
    """
    if q is None:
        return p
    residual = p.clone()
    residual[..., : q.shape[-1]] -= q
    residual.clamp_(min=0)
    return torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)


def last_token_of_round(proposals: Tensor, accepted: Tensor, cut: int, p: Tensor, q: Optional[Tensor],
                        generator: Optional[torch.Generator]) -> Tensor:
    """Sampled token ``[B]`` at position ``cut`` of the round, where the batch stops.

    A row that accepted more than ``cut`` proposals keeps its proposal ``y_{cut+1}`` (an accepted
    sample is already a sample of ``p_cut``); the others draw from the residual of ``p_cut``
    (``cut < g``) or, when all g proposals were accepted, from ``p_g``.

    Args:
        proposals: ``[B, g]``; accepted: ``[B]`` each row's accepted count (≥ ``cut``).
        p: ``[B, V]`` the target's distribution at position ``cut``; q: ``[B, Vq]`` the proposal
            distribution there, or None when ``cut == g``.
    """
    drawn = torch.multinomial(residual_probs(p, q), 1, generator=generator).squeeze(1)
    if cut == proposals.shape[1]:
        return drawn
    return torch.where(accepted > cut, proposals[:, cut], drawn)


__all__ = ["MIXTURE", "check_proposal", "greedy_accepted", "last_token_of_round", "leading_run",
           "proposal_probs", "propose", "residual_probs", "sampling_accepted"]
