"""The K-branch draft model as a vLLM model class (registered by :mod:`.plugin`).

``DraftEnsembleForCausalLM`` runs the trunk (embedding + S Llama layers) once per token and the K
branches (``L − S`` layers each, their own attention and KV pages) on the trunk's output. Its
``forward`` returns the K final hidden states side by side, ``[T, K·H]`` (the exported config says
``hidden_size = K·H``, so vLLM's draft buffers carry all K). ``compute_logits`` turns rows of that
into the K drafts' logits ``z [K, N, V]`` and returns the mixture's log-probabilities
``log q̄ = logsumexp_k(log w_k + log_softmax(z_k))``, from which vLLM proposes (argmax when greedy),
exactly as :meth:`epikern.DraftEstimator.generate` proposes from ``q̄``.

Two switches let :mod:`.runner_hooks` see what the EU needs without a second pass:
``record`` (a list or None) collects every ``z`` that ``compute_logits`` makes (the γ proposal
steps of a round), and ``score_rows`` (token indices or None) makes the next ``forward`` keep a copy
of those rows of its output in ``captured`` (in the first draft pass of a round: the slot before
each request's new token, the last emitted token's prefix).

Tensor parallelism and pipeline parallelism are not supported (the LM head is one local tensor).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor, nn
from transformers import AutoConfig

from ...extras import require

require("vllm", "epikern.integrations.vllm's engine side")

from vllm.config import VllmConfig  # noqa: E402  (after the check above)
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size  # noqa: E402
from vllm.model_executor.layers.layernorm import RMSNorm  # noqa: E402
from vllm.model_executor.model_loader.weight_utils import default_weight_loader  # noqa: E402
from vllm.model_executor.models.llama import LlamaDecoderLayer  # noqa: E402

#: HF projection → (vLLM fused parameter, shard id)
FUSED_SHARDS = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class DraftEnsembleForCausalLM(nn.Module):
    """K Llama-family drafts with a shared trunk, as vLLM draft model (see the module docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        if get_tensor_model_parallel_world_size() != 1 or get_pp_group().world_size != 1:
            raise ValueError("the epikern draft ensemble runs without tensor/pipeline parallelism "
                             "(draft_tensor_parallel_size=1, pipeline_parallel_size=1)")
        meta = vllm_config.model_config.hf_config.epikern
        arch = dict(meta["branch_config"])
        self.branch_config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        K, S, L = meta["num_drafts"], meta["shared_layers"], self.branch_config.num_hidden_layers
        V, H = self.branch_config.vocab_size, self.branch_config.hidden_size
        self.num_drafts, self.shared_layers, self.branch_depth, self.hidden = K, S, L - S, H
        self.embed_tokens = nn.Embedding(V, H)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(vllm_config, prefix=f"{prefix}.layers.{j}", config=self.branch_config)
            for j in range(S + K * (L - S)))
        self.norms = nn.ModuleList(RMSNorm(H, eps=self.branch_config.rms_norm_eps) for _ in range(K))
        self.lm_head_weight = nn.Parameter(torch.empty(K, V, H))
        log_w = [math.log(w) if w > 0 else -math.inf for w in meta["weights"]]
        self.register_buffer("log_weights", torch.tensor(log_w, dtype=torch.float32), persistent=False)
        self.weights = list(meta["weights"])
        self.record: Optional[list[Tensor]] = None
        self.score_rows: Optional[Tensor] = None
        self.captured: Optional[Tensor] = None

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: Optional[Tensor], positions: Tensor, intermediate_tensors=None,
                inputs_embeds: Optional[Tensor] = None, **kwargs) -> Tensor:
        """``[T]`` tokens → ``[T, K·H]``: draft k's final-norm hidden state in columns ``k·H .. (k+1)·H``."""
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers[: self.shared_layers]:
            h, residual = layer(positions, h, residual)
        outs = []
        for k in range(self.num_drafts):
            start = self.shared_layers + k * self.branch_depth
            # vLLM's fused add-norm writes its inputs in place: each branch gets its own copy
            hk, rk = h.clone(), None if residual is None else residual.clone()
            for layer in self.layers[start:start + self.branch_depth]:
                hk, rk = layer(positions, hk, rk)
            outs.append(self.norms[k](hk) if rk is None else self.norms[k](hk, rk)[0])
        out = torch.cat(outs, dim=-1)
        if self.score_rows is not None:
            self.captured, self.score_rows = out[self.score_rows], None
        return out

    def draft_logits(self, hidden: Tensor) -> Tensor:
        """``[N, K·H]`` → the K drafts' float32 logits ``[K, N, V]`` (one batched matmul)."""
        h = hidden.view(hidden.shape[0], self.num_drafts, self.hidden).transpose(0, 1)
        return torch.bmm(h, self.lm_head_weight.transpose(1, 2)).float()

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        """``[N, K·H]`` → ``log q̄ [N, V]``, the mixture vLLM proposes from."""
        z = self.draft_logits(hidden_states)
        if self.record is not None:
            self.record.append(z)
        return torch.logsumexp(self.log_weights.view(-1, 1, 1) + z.log_softmax(-1), dim=0)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            parts = name.split(".")
            fused = FUSED_SHARDS.get(parts[-2]) if len(parts) >= 2 else None
            if fused is not None:
                target = ".".join(parts[:-2] + [fused[0], parts[-1]])
                param = params[target]
                param.weight_loader(param, tensor, fused[1])
            else:
                target = name
                param = params[target]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        return loaded
