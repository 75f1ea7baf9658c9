"""The unfused baseline of the kernel benchmarks: ``draft_uncertainty`` as an eager PyTorch
composite, written the way a user would write it with stock ops (log-normalisers by logsumexp,
log_softmax per draft, the mixture through logsumexp over drafts, entropies and KLs as sums over
the vocabulary), and the same composite under ``torch.compile``.

It computes in float32 and materialises several ``[K, N, V]`` tensors. It assumes finite logits
(``0·log 0`` is not guarded, unlike :mod:`epikern.backends.reference`), so it is the *cheapest*
natural composite, not the oracle. The CPU and GPU kernel benchmarks reuse it.
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


def compiled_composite():
    """:func:`composite` under ``torch.compile``: the fused-by-the-compiler baseline (shapes become
    dynamic after the first recompile, so a sweep of batch sizes compiles about twice)."""
    return torch.compile(composite)
