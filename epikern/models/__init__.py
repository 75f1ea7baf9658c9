"""Draft models: :class:`DraftEnsemble` (shared trunk, one KV cache) and :class:`DraftEstimator`."""

from .cache import DraftCache, StackedKVLayer
from .draft_ensemble import DraftEnsemble

__all__ = ["DraftCache", "DraftEnsemble", "StackedKVLayer"]
