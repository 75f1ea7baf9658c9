"""What the training claims rest on, measured on held-out target responses (design §1).

* :func:`mean_jsd`: how much K drafts disagree, ``mean_t JSD_t = mean_t Σ_k w_k KL(q_k,t ‖ q̄_t)``
  over the response tokens, from :meth:`epikern.DraftEstimator.score` (DDD should beat IDD here).
* :func:`kl_to_perturbed_average`: ``mean_t KL(p̄_t ‖ p_t)`` of a model p (the OSD proxy, or the
  clean target) to the average ``p̄ = (1/M) Σ_m p_m`` of M perturbed targets (TokUR's noise, fresh
  members, ``include_clean=False``), the distribution OSD distils to (the proxy should beat the target).

Both average over the counted positions of :class:`~epikern.training.batches.Example` sequences
(the positions that predict response tokens), in batches.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..models import DraftEnsemble, DraftEstimator
from ..ops import forward_kl
from .batches import IGNORE, Example, collate


@torch.no_grad()
def mean_jsd(target: nn.Module, drafts: DraftEnsemble, examples: Sequence[Example], *, pad_id: int,
             batch_size: int = 32) -> float:
    """Mean draft JSD (nats) over the response tokens of ``examples``."""
    estimator = DraftEstimator(target, drafts)
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id, _device(target))
        jsd = estimator.score(batch["input_ids"], batch["attention_mask"]).jsd
        rows = batch["labels"] != IGNORE
        total += float(jsd[rows].double().sum())
        count += int(rows.sum())
    return total / max(count, 1)


@torch.no_grad()
def kl_to_perturbed_average(models: Sequence[nn.Module], perturbation, examples: Sequence[Example], *, pad_id: int,
                            members: int = 16, seed: int = 0, batch_size: int = 16) -> list[float]:
    """Mean ``KL(p̄ ‖ p_model)`` (nats) over the response tokens, one number per model.

    ``p̄`` averages ``members`` perturbed targets (noise from ``torch.Generator().manual_seed(seed)``),
    computed once per batch and shared by all ``models``, so they are measured against the same
    perturbed average.
    """
    device = _device(perturbation.model)
    generator = torch.Generator(device=device).manual_seed(seed)
    totals, count = [0.0] * len(models), 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id, device)
        rows = batch["labels"] != IGNORE
        z = perturbation.member_logits(batch["input_ids"], batch["attention_mask"], num_members=members,
                                       include_clean=False, generator=generator)[:, rows]
        average = torch.logsumexp(torch.log_softmax(z.float(), dim=-1), dim=0) - math.log(members)
        for i, model in enumerate(models):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[rows]
            totals[i] += float(forward_kl(logits.float(), average, reduction="sum"))
        count += int(rows.sum())
    return [t / max(count, 1) for t in totals]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
