"""Models: :class:`DraftEnsemble` (shared trunk, one KV cache), :class:`DraftEstimator`, TokUR's
:class:`Perturbation` and :class:`TokUR`; :mod:`.decoding` is the decoding core they generate with
(where a speculative round proposes, verifies, accepts or rejects, and rolls back)."""

from ..extras import require

require("models", "epikern.models")

from .cache import DraftCache, StackedKVLayer
from .draft_ensemble import DraftEnsemble
from .estimator import DraftEstimator, GenerationResult
from .perturb import Perturbation
from .tokur import ForwardCost, TokUR, TokURGeneration

__all__ = ["DraftCache", "DraftEnsemble", "DraftEstimator", "ForwardCost", "GenerationResult", "Perturbation",
           "StackedKVLayer", "TokUR", "TokURGeneration"]
