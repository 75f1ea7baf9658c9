"""epikern: fused kernels for token-level epistemic uncertainty of LLMs from draft models.

    import epikern as ek
    u = ek.draft_uncertainty(draft_logits, target_logits)   # u.eu, u.jsd, u.kl, ...
"""

from .backends import BackendUnavailableError
from .ops import (
    DraftUncertainty,
    DraftUncertaintyScorer,
    EnsembleUncertainty,
    draft_uncertainty,
    ensemble_uncertainty,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DraftUncertainty",
    "DraftUncertaintyScorer",
    "EnsembleUncertainty",
    "draft_uncertainty",
    "ensemble_uncertainty",
]
from .ops import forward_kl, fused_linear_forward_kl  # noqa: E402
__all__ += ["forward_kl", "fused_linear_forward_kl"]
from .ops import draft_uncertainty_rows  # noqa: E402
__all__ += ["draft_uncertainty_rows"]

# Models need transformers; they are imported on first use so that `import epikern` stays light.
_LAZY_EXPORTS = {name: "epikern.models" for name in
                 ("DraftEnsemble", "DraftEstimator", "Perturbation", "TokUR", "TokURGeneration")}
__all__ += list(_LAZY_EXPORTS)


def __getattr__(name):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'epikern' has no attribute {name!r}")
