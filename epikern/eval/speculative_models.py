"""Draft ensembles made by model surgery for the speculative-decoding benchmark: early-exit drafts of
the target (no training), one draft as a stand-alone HF model (for transformers' assisted
generation) or as a one-draft ensemble, and the random tiny target.
"""

from __future__ import annotations

from ..extras import require

require("eval", __name__)

import copy

import torch
import transformers
from torch import nn

from ..models import DraftEnsemble
from ..models.layers import LINEARS, NORMS

__all__ = ["early_exit_drafts", "draft_as_hf", "single_draft", "tiny_target"]


def early_exit_drafts(model: nn.Module, num_drafts: int, shared_layers: int, branch_layers: int,
                      stride: int = 1) -> DraftEnsemble:
    """K drafts made of ``model``'s own weights, each with ``S + b`` of its L layers.

    Draft k is the embedding, layers ``0..S−1`` (the shared trunk), the b consecutive layers ending
    ``k·stride`` layers before the last one (``L−b−k·stride .. L−1−k·stride``), the final norm and
    the LM head. The drafts differ in their branch window, so they disagree where the skipped
    layers matter — a cheap, untrained stand-in for trained drafts.

    Raises:
        ValueError: a branch window that would overlap the trunk or fall outside the model.
    """
    L = model.config.num_hidden_layers
    lowest = L - branch_layers - (num_drafts - 1) * stride
    if branch_layers < 1 or shared_layers < 0 or lowest < shared_layers:
        raise ValueError(f"{num_drafts} drafts of {shared_layers} trunk + {branch_layers} branch layers (stride "
                         f"{stride}) do not fit in {L} layers without overlapping the trunk")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = shared_layers + branch_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    source = model.get_decoder()
    views = []
    for k in range(num_drafts):
        top = L - k * stride
        with torch.device("meta"):  # a shell; every module below is the target's own
            view = transformers.AutoModelForCausalLM.from_config(config)
        decoder = view.get_decoder()
        decoder.embed_tokens, decoder.norm, decoder.rotary_emb = source.embed_tokens, source.norm, source.rotary_emb
        decoder.layers = nn.ModuleList([source.layers[l] for l in range(shared_layers)]
                                       + [source.layers[l] for l in range(top - branch_layers, top)])
        view.set_output_embeddings(model.get_output_embeddings())
        views.append(view)
    return DraftEnsemble.from_models(views, shared_layers)


def draft_as_hf(drafts: DraftEnsemble, k: int) -> nn.Module:
    """Draft k of ``drafts`` as a stand-alone HF causal LM (for transformers' assisted generation)."""
    config = copy.deepcopy(drafts.config)
    config.tie_word_embeddings = False
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=drafts.embed_tokens.weight.dtype).eval()
    decoder = model.get_decoder()
    with torch.no_grad():
        decoder.embed_tokens.weight.copy_(drafts.embed_tokens.weight)
        for l, stacked in enumerate(drafts.layers):
            g = 0 if l < drafts.shared_layers else k
            for hf_name in LINEARS:
                weight, bias = stacked.projection(hf_name)
                decoder.layers[l].get_submodule(hf_name).weight.copy_(weight[g])
                if bias is not None:
                    decoder.layers[l].get_submodule(hf_name).bias.copy_(bias[g])
            for hf_name in NORMS:
                decoder.layers[l].get_submodule(hf_name).weight.copy_(getattr(stacked, stacked.norm_name(hf_name))[g])
        decoder.norm.weight.copy_(drafts.norm_weight[k])
        model.get_output_embeddings().weight.copy_(drafts.lm_head_weight[k])
    return model


def tiny_target(seed: int = 0) -> nn.Module:
    """A random Llama of 8 layers (hidden 256, vocabulary 4096), fp32, in eval mode."""
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def single_draft(drafts: DraftEnsemble, k: int) -> DraftEnsemble:
    """Draft k alone as a K = 1 ensemble (the one-draft comparison with assisted generation)."""
    return DraftEnsemble.from_models([draft_as_hf(drafts, k)], 0)
