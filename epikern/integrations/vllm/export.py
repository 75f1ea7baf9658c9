"""A :class:`~epikern.DraftEnsemble` as a vLLM draft model directory (and back).

vLLM loads a speculative draft model from a directory with a ``config.json`` and safetensors
weights. :func:`export_drafts` writes the K-branch ensemble there in the layout of
:class:`~epikern.integrations.vllm.model.DraftEnsembleForCausalLM`: one flat list of
``S + K·(L − S)`` Llama decoder layers (the S trunk layers, then draft k's ``L − S`` branch layers
at ``S + k·(L − S) + (l − S)``; each has its own attention, hence its own KV in vLLM's paged cache),
K final norms and a stacked LM head ``[K, V, H]``.

The top-level config describes what vLLM allocates for the draft: ``hidden_size = K·H`` (the model
returns the K branches' final hidden states side by side, so vLLM's draft buffers hold all K) and
``num_hidden_layers = S + K·(L − S)``. The draft's own architecture is kept under ``epikern``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoConfig

from ...models import DraftEnsemble
from ...models.layers import LINEARS, NORMS

ARCHITECTURE = "EpikernDraftEnsembleForCausalLM"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def export_drafts(ensemble: DraftEnsemble, out_dir: Union[str, os.PathLike], *,
                  weights: Optional[Sequence[float]] = None) -> Path:
    """Write ``ensemble`` as a vLLM draft model into ``out_dir`` (created) and return its path.

    Args:
        ensemble: K drafts with an S-layer trunk (Llama-family, full attention).
        out_dir: the directory vLLM's ``speculative_config["model"]`` will name.
        weights: mixture weights ``w_k`` (default ``1/K``); vLLM proposes from
            ``q̄ = Σ_k w_k softmax(z_k)`` and the EU uses the same weights.
    """
    if not isinstance(ensemble, DraftEnsemble):
        raise TypeError(f"ensemble must be an epikern.DraftEnsemble, got {type(ensemble).__name__}")
    K = ensemble.num_drafts
    weights = [1.0 / K] * K if weights is None else [float(w) for w in weights]
    if len(weights) != K or min(weights) < 0 or abs(sum(weights) - 1.0) > 1e-5:
        raise ValueError(f"weights must be {K} non-negative numbers summing to 1, got {weights}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: view.detach().contiguous() for name, view in _weight_slots(ensemble)}
    save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    with open(out / CONFIG_NAME, "w") as f:
        json.dump(_vllm_config(ensemble, weights), f, indent=2, sort_keys=True)
    return out


def read_drafts(draft_dir: Union[str, os.PathLike]) -> tuple[DraftEnsemble, list[float]]:
    """The ensemble and mixture weights :func:`export_drafts` wrote (float32 weights as stored)."""
    meta = read_meta(draft_dir)
    arch = dict(meta["branch_config"])
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    state = load_file(Path(draft_dir) / WEIGHTS_NAME)
    ens = DraftEnsemble(config, meta["num_drafts"], meta["shared_layers"], meta["biases"],
                        dtype=state["embed_tokens.weight"].dtype)
    with torch.no_grad():
        for name, view in _weight_slots(ens):
            view.copy_(state[name])
    return ens, meta["weights"]


def read_meta(draft_dir: Union[str, os.PathLike]) -> dict:
    """The ``epikern`` block of an exported draft directory's config (K, S, weights, the draft config).

    Raises:
        FileNotFoundError: ``draft_dir`` or its config is missing.
        ValueError: the directory holds something other than :func:`export_drafts` output.
    """
    path = Path(draft_dir) / CONFIG_NAME
    if not Path(draft_dir).is_dir():
        raise FileNotFoundError(f"draft directory {str(draft_dir)!r} does not exist; write it with "
                                "epikern.integrations.vllm.export_drafts(ensemble, out_dir)")
    if not path.is_file():
        raise FileNotFoundError(f"{str(draft_dir)!r} has no {CONFIG_NAME}; write it with export_drafts")
    with open(path) as f:
        config = json.load(f)
    if config.get("architectures") != [ARCHITECTURE] or "epikern" not in config:
        raise ValueError(f"{path} is not an epikern draft ensemble export (architectures="
                         f"{config.get('architectures')!r}); write it with export_drafts")
    return config["epikern"]


def _vllm_config(ensemble: DraftEnsemble, weights: list[float]) -> dict:
    branch = ensemble.config.to_dict()
    branch.pop("layer_types", None)  # full attention only (DraftEnsemble checks); indices differ here
    K, S, L = ensemble.num_drafts, ensemble.shared_layers, ensemble.num_layers
    head_dim = getattr(ensemble.config, "head_dim", None) or ensemble.config.hidden_size // ensemble.config.num_attention_heads
    top = dict(branch)
    top.update(architectures=[ARCHITECTURE], hidden_size=K * ensemble.config.hidden_size, head_dim=head_dim,
               num_hidden_layers=S + K * (L - S), tie_word_embeddings=False,
               epikern={"num_drafts": K, "shared_layers": S, "biases": sorted(ensemble.biases),
                        "weights": weights, "branch_config": branch})
    return top


def _weight_slots(ens: DraftEnsemble) -> Iterator[tuple[str, Tensor]]:
    """``(name in the vLLM model, view into the ensemble's parameter)`` for every exported tensor."""
    K, S, L = ens.num_drafts, ens.shared_layers, ens.num_layers
    yield "embed_tokens.weight", ens.embed_tokens.weight
    for l, layer in enumerate(ens.layers):
        groups = [(l, 0)] if l < S else [(S + k * (L - S) + (l - S), k) for k in range(K)]
        for flat, g in groups:
            for hf_name in LINEARS:
                weight, bias = layer.projection(hf_name)
                yield f"layers.{flat}.{hf_name}.weight", weight[g]
                if bias is not None:
                    yield f"layers.{flat}.{hf_name}.bias", bias[g]
            for hf_name in NORMS:
                yield f"layers.{flat}.{hf_name}.weight", getattr(layer, layer.norm_name(hf_name))[g]
    for k in range(K):
        yield f"norms.{k}.weight", ens.norm_weight[k]
    yield "lm_head_weight", ens.lm_head_weight
