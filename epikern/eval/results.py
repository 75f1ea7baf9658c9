"""Typed results of ``epikern bench``: the compared methods and each one's scores, as the report holds
them (:mod:`epikern.eval.report` writes them; :mod:`epikern.eval.bench` computes them).

A metric that is not applicable is ``None`` with a reason (``reasons[key]``), written to the report
as ``null`` and a sibling ``"<key>_reason"`` string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["METHODS", "METHOD_METRICS", "MethodScores", "NotRun"]

#: Every method ``epikern bench`` compares, in report order (:mod:`epikern.eval.estimators`).
METHODS = ("drafts_ddd", "drafts_ddd_osd", "drafts_idd", "single_draft", "oracle_drafts", "tokur", "entropy",
           "maxprob", "loglik", "length")
#: What every method entry of the report holds (a number, or null with a reason).
METHOD_METRICS = ("rmse", "pearson", "auroc_lr", "auroc_tokur", "prr", "flops_per_token", "latency_ms_per_token")


@dataclass
class MethodScores:
    """One method's quality and cost on the benchmark's responses.

    Quality (token level against the ground truth; hallucination detection from aggregated token
    scores, :mod:`epikern.eval.metrics`): ``rmse`` (EU estimates only) and ``rmse_calibrated`` (after
    the cross-fitted linear map of the EU terms: jsd and kl for the draft methods), ``pearson``,
    ``spearman``, ``auroc_lr`` (the logistic regression on all aggregates) and ``auroc_mean`` /
    ``auroc_max`` / ``auroc_sum`` (each aggregate alone), ``auroc_tokur``, ``prr``. Cost per generated token: analytic ``flops_per_token``
    (all of it) and ``extra_flops_per_token`` (beyond plain decoding), ``flops_vs_tokur`` (÷ TokUR's),
    ``latency_ms_per_token``, ``measured_flops_per_token`` (``FlopCounterMode``), and the peak memory of
    scoring one batch.
    """

    description: str
    rmse: Optional[float]
    pearson: float
    spearman: float
    auroc_lr: Optional[float]
    auroc_tokur: float
    prr: Optional[float]
    flops_per_token: float
    extra_flops_per_token: float
    latency_ms_per_token: float
    measured_flops_per_token: float
    peak_memory_bytes: int
    peak_memory_method: str
    features: list[str]  #: the aggregated token-score features of the detector
    reasons: dict[str, str] = field(default_factory=dict)  #: metric → why it is None (or undefined)
    flops_vs_tokur: Optional[float] = None
    rmse_calibrated: Optional[float] = None
    auroc_mean: Optional[float] = None
    auroc_max: Optional[float] = None
    auroc_sum: Optional[float] = None

    def to_json(self) -> dict[str, Any]:
        """The report's method entry: the fields in order, each reason as ``"<key>_reason"``."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("reasons", "flops_vs_tokur")}
        out.update({f"{k}_reason": v for k, v in self.reasons.items()})
        out["flops_vs_tokur"] = self.flops_vs_tokur
        return out


@dataclass(frozen=True)
class NotRun:
    """A method that could not run (its models were not given): every metric null, with the reason."""

    reason: str

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"description": self.reason}
        for key in METHOD_METRICS:
            out[key], out[f"{key}_reason"] = None, self.reason
        return out
