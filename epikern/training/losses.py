"""The objectives the loop minimises and the teachers that distillation reads.

An objective is an ``nn.Module`` around the trained HF causal LM (its only parameters) whose
``forward(input_ids, attention_mask, labels, teacher_logits=None)`` returns the loss **summed** over
the counted positions (``labels != IGNORE``, see :mod:`epikern.training.batches`); the loop divides
by the global count, so a batch split across processes gives the same mean as one process.

    CrossEntropy(model)      Σ_t −log q(labels_t | x_<t+1)                       (target training)
    ForwardKL(student)       Σ_t KL(p_teacher,t ‖ q_student,t)  via ek.fused_linear_forward_kl

A teacher maps a batch (and its examples) to the teacher's logits at the **counted rows only**,
``[N, V]`` in row-major order of ``labels != IGNORE`` (log-probabilities do as well: they are
logits of the same distribution): :class:`CleanTeacher` (the target, each example's rows computed
once and cached), :class:`PosteriorSampleTeacher` (PSD: the target under one fixed draw of TokUR's
perturbation, cached the same way) or :class:`PerturbedTeacher` (OSD: the mixture of m perturbed
targets, fresh noise every call).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.loading import model_vocab_size
from ..ops import fused_linear_forward_kl
from .batches import IGNORE, Example


class CrossEntropy(nn.Module):
    """Summed next-token cross-entropy of ``model`` on the counted positions."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                teacher_logits: Optional[Tensor] = None) -> Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                               reduction="sum")


class ForwardKL(nn.Module):
    """Summed forward KL ``KL(p_teacher ‖ q_student)`` on the counted positions.

    ``teacher_logits [N, V]`` are the teacher's logits at the N counted rows (``labels != IGNORE``,
    row-major). The student's final hidden states of those rows go through ``ek.fused_linear_forward_kl``
    with its LM-head weight, so the ``[N, V]`` student logits never exist (gradients reach the head
    and the hidden states). Under CUDA autocast both are cast to the autocast dtype (bf16).
    """

    def __init__(self, student: nn.Module):
        super().__init__()
        self.model = student

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                teacher_logits: Optional[Tensor] = None) -> Tensor:
        if teacher_logits is None:
            raise ValueError("ForwardKL needs teacher_logits [N counted rows, V]")
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weight = self.model.get_output_embeddings().weight
        rows = labels != IGNORE
        h = hidden[rows]
        if torch.is_autocast_enabled(h.device.type) and h.device.type == "cuda":
            dtype = torch.get_autocast_dtype("cuda")
            h, weight = h.to(dtype), weight.to(dtype)
        else:
            h = h.to(weight.dtype)
        return fused_linear_forward_kl(h, weight, teacher_logits, reduction="sum")


class CleanTeacher:
    """The target's own logits at the counted rows, ``[N, V]`` (no gradient).

    The target is deterministic, so each example's rows are computed on its first batch and cached
    (``num_targets × V`` values per example, in the logits' dtype, on the logits' device); later
    epochs and other drafts over the same examples reuse them.
    """

    def __init__(self, target: nn.Module, cache: bool = True):
        self.target, self.cache = target, {} if cache else None

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The teacher's logits ``[B, T, V]`` of a whole batch."""
        return self.target(input_ids=input_ids, attention_mask=attention_mask).logits

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor], examples: Sequence[Example]) -> Tensor:
        if self.cache is not None and all(e in self.cache for e in examples):
            return torch.cat([self.cache[e] for e in examples])
        rows = self.logits(batch["input_ids"], batch["attention_mask"])[batch["labels"] != IGNORE]
        if self.cache is not None:
            for e, part in zip(examples, rows.split([e.num_targets for e in examples])):
                self.cache[e] = part
        return rows


class PosteriorSampleTeacher(CleanTeacher):
    """PSD's teacher: the target under one **fixed** draw ε of TokUR's perturbation (a posterior sample).

    The logits of :meth:`epikern.models.perturb.Perturbation.member_logits` (one perturbed member,
    clean-KV semantics) with ε ``[L, 2, r]`` applied at every token, so the teacher is deterministic
    and its rows are cached per example like the clean target's.

    Args:
        perturbation: a ``Perturbation`` of the target (TokUR's noise, design §5).
        noise: ε ``[L, 2, r]`` (:func:`epikern.training.drafts.posterior_sample_noise`).
    """

    def __init__(self, perturbation, noise: Tensor, cache: bool = True):
        L, two, _, _, _, r = perturbation.noise_shape(1, 1, 1)
        if tuple(noise.shape) != (L, two, r):
            raise ValueError(f"a posterior sample's noise must be [L, 2, r] = [{L}, {two}, {r}], "
                             f"got {tuple(noise.shape)}")
        super().__init__(perturbation.model, cache)
        self.perturbation, self.noise = perturbation, noise

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        B, T = input_ids.shape
        L, two, r = self.noise.shape
        eps = self.noise.to(input_ids.device)[:, :, None, None, None, :].expand(L, two, 1, B, T, r)
        return self.perturbation.member_logits(input_ids, attention_mask, num_members=1, include_clean=False,
                                               noise=eps)[0]


class PerturbedTeacher:
    """OSD's stochastic teacher: the mixture of m perturbed targets, fresh noise at every call.

    ``log p(v) = logsumexp_m log softmax(z_m)_v − log m`` over m members of
    :meth:`epikern.models.perturb.Perturbation.member_logits` (``include_clean=False``), so with
    m = 1 it is the perturbed target itself (design §1). Since the forward-KL gradient is linear in
    the teacher's probabilities, the expected step equals distilling to the perturbed average.

    Args:
        perturbation: a ``Perturbation`` of the target (TokUR's noise, design §5).
        members: m ≥ 1.
        generator: the noise stream (checkpointed by the loop, so a resumed run draws the same noise).
    """

    def __init__(self, perturbation, members: int, generator: torch.Generator):
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise ValueError(f"the OSD teacher needs members >= 1, got {members!r}")
        self.perturbation, self.members, self.generator = perturbation, members, generator

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor], examples: Sequence[Example]) -> Tensor:
        z = self.perturbation.member_logits(batch["input_ids"], batch["attention_mask"], num_members=self.members,
                                            include_clean=False, generator=self.generator)
        z = z[:, batch["labels"] != IGNORE]
        if self.members == 1:
            return z[0]
        return torch.logsumexp(torch.log_softmax(z.float(), dim=-1), dim=0) - math.log(self.members)


def check_same_vocab(student: nn.Module, teacher: nn.Module, what: str = "draft") -> None:
    """Distillation needs one vocabulary.

    Raises:
        ValueError: the student's LM head emits a different number of logits than the teacher's.
    """
    vs, vt = model_vocab_size(student), model_vocab_size(teacher)
    if vs != vt:
        raise ValueError(f"the {what}'s vocabulary ({vs} logits) differs from the target's ({vt}): a {what} must "
                         "share the target's tokenizer and vocabulary")
