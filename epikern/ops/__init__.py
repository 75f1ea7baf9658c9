"""Public functional ops: validate, allocate, dispatch to a backend (one file per op)."""

from .draft_uncertainty import (
    DraftUncertainty,
    EnsembleUncertainty,
    draft_uncertainty,
    ensemble_uncertainty,
)

__all__ = ["DraftUncertainty", "EnsembleUncertainty", "draft_uncertainty", "ensemble_uncertainty"]
