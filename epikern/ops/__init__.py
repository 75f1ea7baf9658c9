"""Public functional ops: validate, allocate, dispatch to a backend (one file per op)."""

from .draft_uncertainty import (
    DraftUncertainty,
    DraftUncertaintyScorer,
    EnsembleUncertainty,
    draft_uncertainty,
    ensemble_uncertainty,
)

__all__ = ["DraftUncertainty", "DraftUncertaintyScorer", "EnsembleUncertainty", "draft_uncertainty", "ensemble_uncertainty"]
from .forward_kl import forward_kl, fused_linear_forward_kl  # noqa: E402
__all__ += ["forward_kl", "fused_linear_forward_kl"]
from .draft_uncertainty_rows import draft_uncertainty_rows  # noqa: E402
__all__ += ["draft_uncertainty_rows"]
