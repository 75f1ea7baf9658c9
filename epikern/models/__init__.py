"""Draft models: :class:`DraftEnsemble` (shared trunk, one KV cache) and :class:`DraftEstimator`."""

from .cache import DraftCache, StackedKVLayer
from .draft_ensemble import DraftEnsemble
from .estimator import DraftEstimator, GenerationResult

__all__ = ["DraftCache", "DraftEnsemble", "DraftEstimator", "GenerationResult", "StackedKVLayer"]
