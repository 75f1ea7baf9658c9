"""The unfused baselines of the kernel benchmarks, written the way a user would write them with
stock PyTorch ops, eagerly or under ``torch.compile``:

* :func:`composite`: all of ``draft_uncertainty``'s outputs (log-normalisers by logsumexp,
  log_softmax per draft, the mixture through logsumexp over drafts, entropies and KLs as sums
  over the vocabulary);
* :func:`lean_composite`: only the outputs a user asks for — ``jsd`` and ``kl`` for the split,
  ``eu`` without it (design §7 compares the kernel with this one).

They compute in float32 and materialise several ``[K, N, V]`` tensors. They assume finite logits
(``0·log 0`` is not guarded, unlike :mod:`epikern.backends.reference`), so they are the *cheapest*
natural composites, not the oracle. The CPU and GPU kernel benchmarks reuse them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def composite(draft: Tensor, target: Optional[Tensor], weights: Tensor, temperature: float = 1.0,
              decompose: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``draft [K, N, V]``, ``target [N, V]`` or None, ``weights [K]`` →
    ``(stats [6, N], draft_lse [K, N], target_lse [N])`` float32, stats in the order of
    :data:`epikern.backends.reference.STATS` (NaN where the kernel contract has NaN)."""
    w = weights.to(device=draft.device, dtype=torch.float32).view(-1, 1)  # [K, 1]
    x = draft.float() / temperature
    draft_lse = torch.logsumexp(x, dim=-1)  # [K, N]
    log_q = x - draft_lse.unsqueeze(-1)
    q = log_q.exp()
    draft_entropy = (w * -(q * log_q).sum(-1)).sum(0)  # [N]
    nan = torch.full_like(draft_entropy, float("nan"))
    eu = kl = target_entropy = target_lse = mixture_entropy = jsd = nan
    if target is not None:
        y = target.float() / temperature
        target_lse = torch.logsumexp(y, dim=-1)
        log_p = y - target_lse.unsqueeze(-1)
        target_entropy = -(log_p.exp() * log_p).sum(-1)
        eu = (w * (q * (log_q - log_p)).sum(-1)).sum(0)
    if decompose:
        log_qbar = torch.logsumexp(log_q + w.log().unsqueeze(-1), dim=0)  # [N, V]
        qbar = log_qbar.exp()
        mixture_entropy = -(qbar * log_qbar).sum(-1)
        jsd = mixture_entropy - draft_entropy
        if target is not None:
            kl = (qbar * (log_qbar - log_p)).sum(-1)
    stats = torch.stack([eu, jsd, kl, draft_entropy, mixture_entropy, target_entropy])
    return stats, draft_lse, target_lse


def lean_composite(draft: Tensor, target: Optional[Tensor], weights: Tensor, temperature: float = 1.0,
                   decompose: bool = True) -> tuple[Tensor, ...]:
    """Only the outputs asked for, each ``[N]`` float32, from ``draft [K, N, V]``, ``target [N, V]``
    or None and ``weights [K]``:

    * ``decompose`` with a target: ``(jsd, kl)``; without a target: ``(jsd,)``, the mutual
      information — ``log q_k = log_softmax(z_k/T)``, ``log q̄ = logsumexp_k(log w_k + log q_k)``,
      ``jsd = Σ_k w_k Σ_v q_k (log q_k − log q̄)``, ``kl = Σ_v q̄ (log q̄ − log p)``;
    * not ``decompose``: ``(eu,)`` with ``eu = Σ_k w_k Σ_v q_k (log q_k − log p)`` (a target is
      needed).
    """
    w = weights.to(device=draft.device, dtype=torch.float32)
    log_q = torch.log_softmax(draft.float() / temperature, dim=-1)  # [K, N, V]
    log_p = None if target is None else torch.log_softmax(target.float() / temperature, dim=-1)
    if not decompose:
        if log_p is None:
            raise ValueError("lean_composite: eu (decompose=False) needs target logits")
        return ((w.view(-1, 1) * (log_q.exp() * (log_q - log_p)).sum(-1)).sum(0),)
    log_qbar = torch.logsumexp(log_q + w.log().view(-1, 1, 1), dim=0)  # [N, V]
    jsd = (w.view(-1, 1) * (log_q.exp() * (log_q - log_qbar)).sum(-1)).sum(0)
    if log_p is None:
        return (jsd,)
    return jsd, (log_qbar.exp() * (log_qbar - log_p)).sum(-1)


def compiled_composite():
    """:func:`composite` under ``torch.compile``: the fused-by-the-compiler baseline (shapes become
    dynamic after the first recompile, so a sweep of batch sizes compiles about twice)."""
    return torch.compile(composite)
