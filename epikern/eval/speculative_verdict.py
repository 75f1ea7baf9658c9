"""design §7's speed target for speculative decoding, applied to measured rows (the policy, apart from
the measurement in :mod:`epikern.eval.speculative_measure`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .speculative_measure import VariantRow

__all__ = ["spec7_verdict", "plain_tokens_per_s"]


def spec7_verdict(row: "VariantRow", plain_tokens_per_s: float, accepted_per_round: int = 2) -> str:
    """design §7's speed target for one speculative row: tokens/s ≥ plain target decoding wherever the
    drafts are cheaper than the target and accept ≥ 2 tokens per round.

    "Accept ≥ 2 tokens per round" is read literally: at least ``accepted_per_round`` of the drafts'
    proposals accepted a round on average (``tokens_per_round − 1``: the round's last token is the
    target's own); ``accepted_per_round=1`` is the loose reading, ≥ 2 tokens a target forward.
    "Cheaper" is the project's cost metric, analytic FLOPs a token (``row.draft_flops_vs_target``:
    all drafts that ran ÷ the target, at the mean decode context): a step's wall time also measures
    the implementation (epikern's stacked step dispatches less than an HF module), so the target
    itself as its draft runs faster per step than the target yet costs exactly as much. "Plain target
    decoding" is the faster of ``hf`` and ``plain`` in the same run (``plain_tokens_per_s``).

    Returns ``"met"``, ``"not met"``, or why the row is outside the condition.
    """
    if row.draft_flops_vs_target >= 1:
        return "outside: drafts not cheaper"
    if row.tokens_per_round - 1 < accepted_per_round:
        return f"outside: < {accepted_per_round} accepted/round"
    return "met" if row.tokens_per_s >= plain_tokens_per_s else "not met"


def plain_tokens_per_s(rows: Sequence["VariantRow"]) -> float:
    """Plain target decoding's speed in a run: the faster of ``hf`` and ``plain`` (EU off)."""
    return max(r.tokens_per_s for r in rows if r.variant.kind in ("hf", "plain") and not r.variant.eu)
