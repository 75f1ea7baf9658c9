"""Pure-PyTorch reference of every epikern op: the oracle for tests and the ``torch`` backend.

Everything is computed in ``dtype`` (float64 for the oracle, float32 for the backend) with the
numerics of design §1: log-space mixtures, ``0·log 0 = 0``, ``−inf`` logits allowed, ``+inf`` where a
distribution puts mass on a token the reference gives probability zero, NaN confined to its row.

Notation (per row, vocabulary V, temperature T):
    q_k = softmax(z_k / T)            draft k,  k = 1..K, weights w_k
    q̄  = Σ_k w_k q_k                  mixture,  log q̄ = logsumexp_k(log w_k + log q_k)
    p   = softmax(z_p / T)            reference (target or OSD proxy)
    eu  = Σ_k w_k KL(q_k ‖ p) = jsd + kl
    jsd = Σ_k w_k KL(q_k ‖ q̄),  kl = KL(q̄ ‖ p)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .contract import OutputRows

#: Order of the rows of the packed ``stats`` tensor every backend writes.
STATS = ("eu", "jsd", "kl", "draft_entropy", "mixture_entropy", "target_entropy")

NAME = "torch"


def check_available() -> None:
    """The reference runs wherever PyTorch does."""


def _plogq(p: Tensor, log_q: Tensor) -> Tensor:
    """``p · log q`` with ``0 · log 0 = 0`` (and ``0 · anything = 0``); NaN in p propagates."""
    return torch.where(p != 0, p * log_q, torch.zeros((), dtype=p.dtype, device=p.device))


def _weighted_sum(weights: Tensor, per_draft: Tensor) -> Tensor:
    """``Σ_k w_k x_k`` over dim 0 where a zero weight silences its draft even if ``x_k = ±inf``."""
    w = weights.reshape(-1, *([1] * (per_draft.dim() - 1)))
    return _plogq(w.expand_as(per_draft), per_draft).sum(0)


def draft_uncertainty(
    draft_logits: Tensor,
    target_logits: Optional[Tensor],
    weights: Tensor,
    temperature: float = 1.0,
    decompose: bool = True,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of ``epikern::draft_uncertainty`` on flattened rows.

    Args:
        draft_logits: ``[K, N, V]`` logits of K drafts.
        target_logits: ``[N, V]`` logits of the reference distribution p, or None.
        weights: ``[K]`` non-negative mixture weights summing to 1.
        temperature: T > 0; every distribution is ``softmax(z / T)``.
        decompose: compute the mixture quantities (``jsd``, ``kl``, ``mixture_entropy``);
            otherwise they are NaN.
        dtype: accumulation dtype (float64 for the oracle).

    Returns:
        ``stats [6, N]`` in the order of :data:`STATS`, ``draft_lse [K, N]`` =
        ``logsumexp(z_k / T)`` and ``target_lse [N]``, all in ``dtype``. Quantities that need the
        target are NaN without it.
    """
    x = draft_logits.to(dtype) / temperature  # [K, N, V]
    w = weights.to(dtype=dtype, device=x.device)
    K, N, _ = x.shape
    nan = torch.full((N,), float("nan"), dtype=dtype, device=x.device)

    draft_lse = torch.logsumexp(x, dim=-1)  # [K, N]
    log_q = x - draft_lse.unsqueeze(-1)
    q = log_q.exp()
    draft_entropy = _weighted_sum(w, -_plogq(q, log_q).sum(-1))

    if target_logits is not None:
        y = target_logits.to(dtype) / temperature  # [N, V]
        target_lse = torch.logsumexp(y, dim=-1)
        log_p = y - target_lse.unsqueeze(-1)
        target_entropy = -_plogq(log_p.exp(), log_p).sum(-1)
        # KL(q_k ‖ p) = Σ_v q_kv (log q_kv − log p_v); q_kv = 0 terms vanish, p_v = 0 gives +inf,
        # also where q_kv > 0 underflows to 0 in float32 (log q_kv finite, > 90 nats below the max)
        log_ratio = log_q - log_p
        kl_to_target = torch.where(log_ratio == float("inf"), log_ratio,
                                   _plogq(q, log_ratio)).sum(-1)  # [K, N]
        eu = _weighted_sum(w, kl_to_target)
    else:
        target_lse = target_entropy = eu = nan

    if decompose:
        log_w = w.log().reshape(K, 1, 1)
        log_qbar = torch.logsumexp(log_w + log_q, dim=0)  # [N, V]
        qbar = log_qbar.exp()
        mixture_entropy = -_plogq(qbar, log_qbar).sum(-1)
        jsd = _weighted_sum(w, _plogq(q, log_q - log_qbar).sum(-1))
        if target_logits is not None:  # +inf where p_v = 0 even if q̄_v underflowed (log q̄_v is finite)
            d = log_qbar - log_p
            kl = torch.where(d == float("inf"), d, _plogq(qbar, d)).sum(-1)
        else:
            kl = nan
    else:
        mixture_entropy = jsd = kl = nan

    stats = torch.stack([eu, jsd, kl, draft_entropy, mixture_entropy, target_entropy])
    return stats, draft_lse, target_lse


def draft_uncertainty_out(
    draft_logits: Tensor,
    target_logits: Optional[Tensor],
    weights: Tensor,
    temperature: float,
    decompose: bool,
    stats: Tensor,
    draft_lse: Tensor,
    target_lse: Tensor,
) -> None:
    """Backend entry point: float32 accumulation, results written into the given outputs."""
    s, d, t = draft_uncertainty(
        draft_logits, target_logits, weights, temperature, decompose, dtype=torch.float32
    )
    stats.copy_(s)
    draft_lse.copy_(d)
    target_lse.copy_(t)


def draft_uncertainty_rows(
    draft_logits: Tensor,
    target_logits: Optional[Tensor],
    rows: OutputRows,
    weights: Tensor,
    decompose: bool = True,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Reference of ``epikern::draft_uncertainty_rows``: the packed ``[7 + K, N]`` outputs.

    Gathers each output row's draft rows ``draft_logits[:, rows.draft[n]]`` and target row
    ``target_logits[rows.target[n]]`` (a copy: this is the oracle, the kernels read in place),
    scales them by ``rows.inv_temperature[n]`` and runs :func:`draft_uncertainty` at ``T = 1``.
    Rows 0-5 are the stats, 6 … 5 + K ``draft_lse`` and 6 + K ``target_lse``; skipped rows (see
    :class:`~epikern.backends.contract.OutputRows`) are NaN.
    """
    K, R_d, V = draft_logits.shape
    N = rows.count
    inv_t = rows.inv_temperature.to(dtype)
    keep = (inv_t > 0) & (inv_t < float("inf"))
    d_idx, keep = _gathered_index(rows.draft, N, R_d, keep)
    x = draft_logits[:, d_idx].to(dtype) * inv_t[None, :, None]
    y = None
    if target_logits is not None:
        t_idx, keep = _gathered_index(rows.target, N, target_logits.shape[0], keep)
        y = target_logits[t_idx].to(dtype) * inv_t[:, None]
    stats, draft_lse, target_lse = draft_uncertainty(x, y, weights, 1.0, decompose, dtype)
    packed = torch.cat([stats, draft_lse, target_lse[None]])
    return torch.where(keep, packed, torch.full((), float("nan"), dtype=dtype, device=packed.device))


def _gathered_index(index: Optional[Tensor], n: int, rows: int, keep: Tensor) -> tuple[Tensor, Tensor]:
    """``(row to gather per output row, keep)``: the map (identity if None) with skipped entries
    (negative or ``≥ rows``) replaced by row 0 and removed from ``keep``."""
    idx = torch.arange(n, device=keep.device) if index is None else index.long()
    valid = (idx >= 0) & (idx < rows)
    return torch.where(valid, idx, torch.zeros_like(idx)), keep & valid


def draft_uncertainty_rows_out(
    draft_logits: Tensor,
    target_logits: Optional[Tensor],
    rows: OutputRows,
    weights: Tensor,
    decompose: bool,
    out: Tensor,
) -> None:
    """Backend entry point: :func:`draft_uncertainty_rows` in float32, written into ``out``."""
    out.copy_(draft_uncertainty_rows(draft_logits, target_logits, rows, weights, decompose,
                                     dtype=torch.float32))


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    dtype: Optional[torch.dtype] = torch.float64,
) -> Tensor:
    """Reference forward KL ``KL(softmax(t/T) ‖ softmax(s/T))`` per row, differentiable in s.

    No ``T²`` factor is applied. Rows whose label equals ``ignore_index`` are dropped; ``"mean"``
    averages over the kept rows and is 0 when none is kept.

    Args:
        student_logits: ``[N, V]``.
        teacher_logits: ``[N, V]``; ``−inf`` entries are tokens the teacher never emits.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[N]``, dropped rows are 0).
        labels: ``[N]`` integer labels or None (keep every row).
        dtype: accumulation dtype, or None to keep the student's dtype.
    """
    s = student_logits if dtype is None else student_logits.to(dtype)
    t = teacher_logits.to(s.dtype)
    log_q = torch.log_softmax(s / temperature, dim=-1)
    log_p = torch.log_softmax(t / temperature, dim=-1)
    per_row = _plogq(log_p.exp(), log_p - log_q).sum(-1)
    if labels is not None:
        keep = labels != ignore_index
        per_row = torch.where(keep, per_row, torch.zeros_like(per_row))
        kept = keep.sum()
    else:
        kept = torch.tensor(per_row.shape[0], device=per_row.device)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / kept.clamp(min=1).to(per_row.dtype)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


#: Elements per block of rows in the torch backend's forward-KL loops (bounds its temporaries).
_FORWARD_KL_BLOCK = 1 << 22


def _forward_kl_row_blocks(n: int, vocab: int):
    step = max(1, _FORWARD_KL_BLOCK // max(vocab, 1))
    return (slice(i, min(i + step, n)) for i in range(0, n, step))


def forward_kl_out(
    student: Tensor,
    teacher: Tensor,
    keep: Optional[Tensor],
    temperature: float,
    loss: Tensor,
    student_lse: Tensor,
    teacher_lse: Tensor,
) -> None:
    """Backend entry of ``epikern::forward_kl`` on ``[N, V]`` rows, in ``loss.dtype``.

    Writes ``loss = KL(softmax(t/T) ‖ softmax(s/T))``, ``student_lse = logsumexp(s/T)`` and
    ``teacher_lse = logsumexp(t/T)`` per row; rows with ``keep = False`` get zeros. Works on
    blocks of rows so that no temporary is larger than about 2**22 elements.
    """
    dtype = loss.dtype
    for rows in _forward_kl_row_blocks(student.shape[0], student.shape[1]):
        x = student[rows].to(dtype) / temperature
        y = teacher[rows].to(dtype) / temperature
        ls, lt = torch.logsumexp(x, dim=-1), torch.logsumexp(y, dim=-1)
        log_p = y - lt.unsqueeze(-1)
        d = log_p - (x - ls.unsqueeze(-1))
        # a finite teacher logit against a −inf student logit is +inf even if p underflows
        kl = torch.where(d == float("inf"), d, _plogq(log_p.exp(), d)).sum(-1)
        if keep is not None:
            zero = torch.zeros((), dtype=dtype, device=kl.device)
            k = keep[rows]
            kl, ls, lt = (torch.where(k, v, zero) for v in (kl, ls, lt))
        loss[rows] = kl
        student_lse[rows] = ls
        teacher_lse[rows] = lt


def forward_kl_backward_out(
    grad_loss: Tensor,
    student: Tensor,
    teacher: Tensor,
    student_lse: Tensor,
    teacher_lse: Tensor,
    temperature: float,
    grad_student: Tensor,
) -> None:
    """Backend entry of ``epikern::forward_kl_backward``: ``g_i (q_iv − p_iv) / T`` per element.

    ``q = exp(s/T − student_lse)``, ``p = exp(t/T − teacher_lse)``; rows with ``g_i = 0`` are
    zeros. ``grad_student`` (the student's dtype) may alias ``student``.
    """
    dtype = student_lse.dtype
    for rows in _forward_kl_row_blocks(student.shape[0], student.shape[1]):
        g = grad_loss[rows].to(dtype).unsqueeze(-1)
        q = (student[rows].to(dtype) / temperature - student_lse[rows].unsqueeze(-1)).exp()
        p = (teacher[rows].to(dtype) / temperature - teacher_lse[rows].unsqueeze(-1)).exp()
        zero = torch.zeros((), dtype=dtype, device=g.device)
        grad_student[rows] = torch.where(g != 0, (q - p) * (g / temperature), zero)
