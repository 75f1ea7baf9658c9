"""``ek.draft_uncertainty`` and ``ek.ensemble_uncertainty``: token-level EU from K drafts.

Per row (token position) with drafts ``q_k = softmax(z_k/T)``, weights ``w_k``, mixture
``q̄ = Σ_k w_k q_k`` and reference ``p = softmax(z_p/T)``:

    eu  = Σ_k w_k KL(q_k ‖ p)          = jsd + kl           (bias–variance identity, exact)
    jsd = H(q̄) − Σ_k w_k H(q_k)        = Σ_k w_k KL(q_k ‖ q̄)   variance proxy
    kl  = KL(q̄ ‖ p)                                         bias proxy

``eu``, the entropies and the log-normalisers need one sweep over the vocabulary; only the split
into ``jsd`` and ``kl`` (``decompose=True``) needs a second, because ``log q̄_v`` needs every
draft's normaliser first. All backends write a packed ``stats [6, N]`` tensor (order
:data:`epikern.backends.reference.STATS`), ``draft_lse [K, N]`` and ``target_lse [N]``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import backends
from ..backends.reference import STATS
from . import _checks, flops


class DraftUncertainty(NamedTuple):
    """float32 results of :func:`draft_uncertainty`, each shaped ``[*batch]`` unless noted (nats)."""

    eu: Tensor  #: Σ_k w_k KL(q_k ‖ p); NaN without a target; +inf if p_v = 0 where some q_k,v > 0
    jsd: Tensor  #: Σ_k w_k KL(q_k ‖ q̄); NaN when decompose=False
    kl: Tensor  #: KL(q̄ ‖ p); NaN without a target or when decompose=False
    draft_entropy: Tensor  #: Σ_k w_k H(q_k)
    mixture_entropy: Tensor  #: H(q̄); NaN when decompose=False
    target_entropy: Tensor  #: H(p); NaN without a target
    draft_lse: Tensor  #: [K, *batch] logsumexp(z_k / T)
    target_lse: Tensor  #: logsumexp(z_p / T); NaN without a target


class EnsembleUncertainty(NamedTuple):
    """float32 results of :func:`ensemble_uncertainty`, each shaped ``[*batch]`` (nats)."""

    total: Tensor  #: H(p̄), entropy of the member average
    aleatoric: Tensor  #: mean_m H(p_m)
    epistemic: Tensor  #: total − aleatoric, the mutual information (computed without cancellation)


def _draft_uncertainty_flat(
    draft_logits: Tensor,
    target_logits: Optional[Tensor],
    weights: Tensor,
    temperature: float,
    decompose: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Packed op on flattened rows: ``draft [K, N, V]`` (unit stride over V), ``target [N, V]``.

    ``backend`` is a backend name or ``""`` for automatic selection; it is resolved here, at run
    time, so that compiled graphs see one opaque call.
    """
    name = backends.select("draft_uncertainty", draft_logits.device, backend or None)
    _checks.check_reference_dtype(name, draft_logits=draft_logits, target_logits=target_logits)
    out = _outputs(draft_logits)
    backends.entry("draft_uncertainty", name)(draft_logits, target_logits, weights, temperature, decompose, *out)
    return out


def _outputs(draft_rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Empty float32 ``stats [6, N]``, ``draft_lse [K, N]``, ``target_lse [N]`` for ``[K, N, V]`` rows."""
    K, N, _ = draft_rows.shape
    return (draft_rows.new_empty((len(STATS), N), dtype=torch.float32),
            draft_rows.new_empty((K, N), dtype=torch.float32),
            draft_rows.new_empty((N,), dtype=torch.float32))


def _unpacked(stats: Tensor, draft_lse: Tensor, target_lse: Tensor, batch: Sequence[int]) -> DraftUncertainty:
    """The packed outputs on ``N = prod(batch)`` rows as fields shaped ``[*batch]``."""
    return DraftUncertainty(*stats.reshape(len(STATS), *batch).unbind(0),
                            draft_lse=draft_lse.reshape(draft_lse.shape[0], *batch), target_lse=target_lse.reshape(batch))


_draft_uncertainty_op = torch.library.custom_op("epikern::draft_uncertainty", mutates_args=())(_draft_uncertainty_flat)


@_draft_uncertainty_op.register_fake
def _(draft_logits, target_logits, weights, temperature, decompose, backend):
    return _outputs(draft_logits)


# FLOPs of the op for FlopCounterMode (ops/flops.py), which by its convention counts only matmuls
# (a multiply-add = 2 FLOPs). This op has no matmul; its count is the scalar arithmetic of the
# algorithm in the module docstring per vocabulary entry (each add, multiply, compare, exp or log =
# 1 FLOP, a multiply-add = 2); per-row work that does not scale with V is not counted.
#: FLOPs per draft entry in the first sweep: z/T, running-max compare, z − m, exp, s += e,
#: a += e·z (multiply-add, 2).
SWEEP1_PER_DRAFT_ENTRY = 7
#: ... plus b += e·z_p (2) per draft entry when a reference is given.
SWEEP1_PER_DRAFT_ENTRY_WITH_TARGET = 2
#: FLOPs per reference entry in the first sweep: the same 7 as a draft's own statistics.
SWEEP1_PER_TARGET_ENTRY = 7
#: FLOPs per draft entry in the second sweep (decompose=True): log q_k = z/T − lse_k (2), the running
#: logsumexp over k of log w_k + log q_k (add, compare, subtract, exp, add: 5), and the jsd term
#: w_k·q_k·(log q_k − log q̄) (exp, subtract, multiply, multiply-add: 5).
SWEEP2_PER_DRAFT_ENTRY = 12
#: FLOPs per vocabulary entry in the second sweep, once per row: log q̄ = m + log s (2) and the
#: H(q̄) term (multiply-add, 2).
SWEEP2_PER_ENTRY = 4
#: ... plus the kl term q̄·(log q̄ − log p) when a reference is given: exp, z_p/T − lse_p (2),
#: subtract, multiply-add (2).
SWEEP2_PER_TARGET_ENTRY = 6


def draft_uncertainty_flops(K: int, N: int, V: int, has_target: bool, decompose: bool) -> int:
    """FLOPs of ``epikern::draft_uncertainty`` on ``[K, N, V]`` drafts (and an ``[N, V]`` reference).

    ``N·V·(K·(7 + 2·t) + 7·t) + decompose·N·V·(12·K + 4 + 6·t)`` with ``t = has_target``: the
    scalar operations per vocabulary entry listed in the ``SWEEP*`` constants of this module (an
    exp or log counts 1, a multiply-add 2). ``ensemble_uncertainty`` is ``t = 0, decompose = 1``.
    """
    t = int(bool(has_target))
    sweep1 = K * (SWEEP1_PER_DRAFT_ENTRY + t * SWEEP1_PER_DRAFT_ENTRY_WITH_TARGET) + t * SWEEP1_PER_TARGET_ENTRY
    sweep2 = K * SWEEP2_PER_DRAFT_ENTRY + SWEEP2_PER_ENTRY + t * SWEEP2_PER_TARGET_ENTRY
    return N * V * (sweep1 + (sweep2 if decompose else 0))


@flops.flop_formula("draft_uncertainty")
def _(draft_logits, target_logits, weights, temperature, decompose, backend, out_shape=None) -> int:
    K, N, V = draft_logits
    return draft_uncertainty_flops(K, N, V, target_logits is not None, decompose)


def draft_uncertainty(
    draft_logits: Tensor,
    target_logits: Optional[Tensor] = None,
    *,
    weights: Union[None, Sequence[float], Tensor] = None,
    temperature: float = 1.0,
    decompose: bool = True,
    vocab_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> DraftUncertainty:
    """Token-level epistemic uncertainty of a target from K draft distributions.

    Args:
        draft_logits: ``[K, *batch, V]`` float32/float16/bfloat16 logits of K drafts. Any strides;
            only a strided vocabulary dimension (or batch dims that cannot be merged) is copied.
        target_logits: ``[*batch, V]`` logits of the reference p (the target, or an OSD proxy), or
            None for a draft-only ensemble (then ``eu``, ``kl``, ``target_*`` are NaN).
        weights: K non-negative mixture weights summing to 1 (default ``1/K`` each).
        temperature: T > 0 applied to every distribution, ``softmax(z / T)``.
        decompose: also split ``eu`` into ``jsd + kl`` (one more sweep over the vocabulary).
        vocab_size: compare only the first ``vocab_size`` logits (padded vocabularies that differ).
        backend: ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"``; default by device, or the
            ``EPIKERN_BACKEND`` environment variable.

    Returns:
        :class:`DraftUncertainty` of float32 tensors shaped ``[*batch]`` (``draft_lse``:
        ``[K, *batch]``). ``−inf`` logits are tokens with probability 0. Where p gives a token
        probability 0 that a draft does not, ``kl``/``eu`` are ``+inf``; a row whose logits are all
        ``−inf`` or contain NaN yields NaN in that row only.
    """
    flops.register_flop_formulas()
    _checks.check_logits("draft_logits", draft_logits, min_dim=2)
    K, *batch, V = draft_logits.shape
    if K == 0:
        raise ValueError(f"draft_logits needs at least one draft (K >= 1), got shape {tuple(draft_logits.shape)}")
    if target_logits is not None:
        _checks.check_logits("target_logits", target_logits, min_dim=1)
        if target_logits.dim() != draft_logits.dim() - 1:
            raise ValueError(
                f"target_logits must have rank {draft_logits.dim() - 1} "
                f"([*batch, V] for drafts [K, *batch, V]), got target {tuple(target_logits.shape)} "
                f"and drafts {tuple(draft_logits.shape)}"
            )
        if list(target_logits.shape[:-1]) != batch:
            raise ValueError(
                f"batch shapes differ: drafts {tuple(draft_logits.shape)} vs target {tuple(target_logits.shape)}"
            )
    draft_logits, target_logits = _checks.shared_vocab(
        vocab_size, {"draft_logits": draft_logits, "target_logits": target_logits})
    V = draft_logits.shape[-1]
    # CPU weights are accepted for accelerator logits (copied); accelerator weights must match.
    device_weights = weights if isinstance(weights, Tensor) and weights.device.type != "cpu" else None
    device = _checks.check_same_device(draft_logits=draft_logits, target_logits=target_logits,
                                       weights=device_weights)
    temperature = _checks.check_temperature(temperature)
    w = _checks.uniform_or_checked_weights(weights, K, device)

    N = math.prod(batch)
    draft_rows = _checks.last_dim_contiguous(draft_logits.reshape(K, N, V))
    target_rows = None if target_logits is None else _checks.last_dim_contiguous(target_logits.reshape(N, V))
    if N == 0:
        return _unpacked(*_outputs(draft_rows), batch)
    op = _draft_uncertainty_op if _checks.through_dispatcher(draft_rows, target_rows, w) else _draft_uncertainty_flat
    return _unpacked(*op(draft_rows, target_rows, w, temperature, bool(decompose), backend or ""), batch)


class DraftUncertaintyScorer:
    """:func:`draft_uncertainty` with its settings checked once, for a loop that calls it every round.

    A decoding loop scores a few rows per round with the same K, weights, temperature, backend and
    vocabulary; re-validating them per call costs more than the kernel on small rows (~50 µs of
    ~100 µs in situ on a CPU). ``scorer = DraftUncertaintyScorer(K, device, weights=..., ...)``
    resolves them here; ``scorer(draft_logits [K, *batch, V], target_logits [*batch, V])`` returns
    exactly what ``draft_uncertainty(draft_logits, target_logits, **settings)`` returns. A call
    whose inputs do not fit the fast path (another device or K, mismatched shapes, no rows, autograd,
    ``torch.compile`` or a dispatch mode such as ``FlopCounterMode``) goes through
    :func:`draft_uncertainty` itself, with its checks, errors and registered op.
    """

    def __init__(self, num_drafts: int, device: Union[str, torch.device], *,
                 weights: Union[None, Sequence[float], Tensor] = None, temperature: float = 1.0,
                 decompose: bool = True, vocab_size: Optional[int] = None, backend: Optional[str] = None):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # tensors say "cuda:<current>", never "cuda"
            device = torch.device("cuda", torch.cuda.current_device())
        self.num_drafts, self.device = int(num_drafts), device
        if self.num_drafts < 1:
            raise ValueError(f"num_drafts must be >= 1, got {num_drafts!r}")
        if vocab_size is not None:
            _checks.check_vocab_size(vocab_size)
        self.settings = dict(weights=weights, temperature=_checks.check_temperature(temperature),
                             decompose=bool(decompose), vocab_size=vocab_size, backend=backend)
        self._weights = _checks.uniform_or_checked_weights(weights, self.num_drafts, self.device)
        self._backend = backends.select("draft_uncertainty", self.device, backend)
        self._run = backends.entry("draft_uncertainty", self._backend)

    def __call__(self, draft_logits: Tensor, target_logits: Optional[Tensor] = None) -> DraftUncertainty:
        if not self._fits(draft_logits, target_logits):
            return draft_uncertainty(draft_logits, target_logits, **self.settings)
        K, *batch, V = draft_logits.shape
        cut = self.settings["vocab_size"]
        if cut is not None:
            draft_logits = draft_logits[..., :cut]
            target_logits = None if target_logits is None else target_logits[..., :cut]
            V = cut
        N = math.prod(batch)
        draft_rows = _checks.last_dim_contiguous(draft_logits.reshape(K, N, V))
        target_rows = None if target_logits is None else _checks.last_dim_contiguous(target_logits.reshape(N, V))
        out = _outputs(draft_rows)
        self._run(draft_rows, target_rows, self._weights, self.settings["temperature"], self.settings["decompose"], *out)
        return _unpacked(*out, batch)

    def _fits(self, draft: Tensor, target: Optional[Tensor]) -> bool:
        """Whether the call needs none of :func:`draft_uncertainty`'s checks or dispatching."""
        if not isinstance(draft, Tensor) or draft.dim() < 2 or draft.shape[0] != self.num_drafts \
                or draft.device != self.device or draft.dtype not in _checks.LOGIT_DTYPES or draft.numel() == 0:
            return False
        cut = self.settings["vocab_size"]
        if target is not None and (not isinstance(target, Tensor) or target.dim() != draft.dim() - 1
                                   or target.shape[:-1] != draft.shape[1:-1] or target.device != self.device
                                   or target.dtype not in _checks.LOGIT_DTYPES
                                   or (cut is None and target.shape[-1] != draft.shape[-1])
                                   or (cut is not None and target.shape[-1] < cut)):
            return False
        if cut is not None and draft.shape[-1] < cut:
            return False
        return not _checks.through_dispatcher(draft, target)


def ensemble_uncertainty(
    member_logits: Tensor,
    *,
    weights: Union[None, Sequence[float], Tensor] = None,
    temperature: float = 1.0,
    backend: Optional[str] = None,
) -> EnsembleUncertainty:
    """Total / aleatoric / epistemic uncertainty of an M-member ensemble (TokUR, ground truth).

    ``member_logits [M, *batch, V]`` → ``total = H(p̄)``, ``aleatoric = Σ_m w_m H(p_m)``,
    ``epistemic = Σ_m w_m KL(p_m ‖ p̄)`` (the mutual information), float32 ``[*batch]``. It is the
    same fused kernel as :func:`draft_uncertainty` without a reference.
    """
    u = draft_uncertainty(member_logits, None, weights=weights, temperature=temperature,
                          decompose=True, backend=backend)
    return EnsembleUncertainty(total=u.mixture_entropy, aleatoric=u.draft_entropy, epistemic=u.jsd)
