"""Training (design §1, §6): the tiny target, DDD/IDD drafts and the OSD proxy, all through one loop.

    from epikern.training import build_tiny
    models = build_tiny(quick=True)      # target, DDD and IDD drafts, OSD proxy; cached after the first call

    from epikern.training import DraftsRecipe, train_drafts
    train_drafts(DraftsRecipe(target="runs/target", partitions=2, drafts_per_partition=2), "runs/ddd")

Modules: ``config`` (TrainConfig and the recipes), ``loop`` (the training loop), ``checkpoint``,
``batches``, ``losses`` (objectives and teachers), ``target``, ``drafts``, ``proxy``, ``responses``,
``diagnostics``, ``pipeline`` (``build_tiny``), ``cli`` (``epikern train``). The names below are
imported on first use, so that ``import epikern.training.cli`` stays light.
"""

from ..extras import require

require("train", "epikern.training")

import importlib

_EXPORTS = {
    "TrainConfig": "config", "TinyModelConfig": "config", "TargetRecipe": "config", "DraftsRecipe": "config",
    "ProxyRecipe": "config", "train": "loop", "TrainResult": "loop", "train_target": "target",
    "train_drafts": "drafts", "train_proxy": "proxy", "build_tiny": "pipeline", "tiny_pipeline": "pipeline",
    "TinyPipeline": "pipeline", "TinyModels": "pipeline", "CheckpointError": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'epikern.training' has no attribute {name!r}")
