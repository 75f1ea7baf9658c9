"""``ek.DraftEnsemble``: K draft LMs with a shared trunk, one KV cache and one batched step (design §4).

The K drafts are Llama-family causal LMs of one architecture (``transformers`` 5.x Llama, Mistral,
Qwen2). The embedding and the first S decoder layers (the *trunk*) are one set of weights; they run
once per token and their KV is cached once. Layers ``S..L-1``, the final norm and the LM head (the
*branches*) are per draft, stacked on a leading K dimension, and all K advance in one batched step:
every projection is one ``bmm`` over K and attention folds K into the batch. See
:mod:`epikern.models.layers` for the layer math and :mod:`epikern.models.cache` for the cache.

    ens = DraftEnsemble.from_models([draft_0, ..., draft_3], shared_layers=4)
    cache = ens.new_cache(batch_size=2)
    logits = ens(prompt_ids, attention_mask, cache=cache)    # [K, B, T, V]
    logits = ens(next_ids, attention_mask, cache=cache)      # [K, B, 1, V], mask grown by one
"""

from __future__ import annotations

import json
import os
import sys
from typing import Iterable, Iterator, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .cache import DraftCache
from .layers import LINEARS, NORMS, StackedDecoderLayer, grouped_linear, in_major, rms_norm, rotary_tables
from .fused_step import fusable, fused_forward
from .masks import causal_mask, check_mask_shape, position_ids_from_mask

CONFIG_NAME = "draft_ensemble.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "epikern.DraftEnsemble"

#: Config fields that must agree between drafts (the architecture, not the training run).
ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
               "rope_parameters", "max_position_embeddings", "sliding_window", "layer_types")


class DraftEnsemble(nn.Module):
    """K drafts of one Llama-family architecture sharing the embedding and the first S layers.

    Build it with :meth:`from_models`, :meth:`from_base` or :meth:`from_pretrained`; the constructor
    makes a randomly initialised ensemble (normal(0, ``initializer_range``) matrices, unit norms).

    Args:
        config: the HF config of one draft (``LlamaConfig``, ``MistralConfig``, ``Qwen2Config``).
        num_drafts: K ≥ 1.
        shared_layers: S in ``[0, L]``; ``S = 0`` shares only the embedding (and the cache object).
        biases: HF projection names that carry a bias, e.g. ``{"self_attn.q_proj", ...}`` (Qwen2).

    Parameters: ``embed_tokens.weight [V, H]``; ``layers[l]`` a :class:`StackedDecoderLayer` with
    1 group for ``l < S`` and K groups otherwise; ``norm_weight [K, H]``; ``lm_head_weight [K, V, H]``
    (:func:`~epikern.models.layers.in_major`, as the layers' matrices).
    """

    def __init__(self, config, num_drafts: int, shared_layers: int, biases: Iterable[str] = (), *,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        L = config.num_hidden_layers
        if num_drafts < 1:
            raise ValueError(f"num_drafts must be >= 1, got {num_drafts}")
        if not 0 <= shared_layers <= L:
            raise ValueError(f"shared_layers must be in [0, num_hidden_layers={L}], got {shared_layers}")
        biases = frozenset(biases)
        if not biases <= set(LINEARS):
            raise ValueError(f"unknown bias names {sorted(biases - set(LINEARS))}; known: {LINEARS}")
        self.config = config
        self.sliding_window = _sliding_window(config)
        self.num_drafts, self.shared_layers, self.biases = num_drafts, shared_layers, biases
        V, H = config.vocab_size, config.hidden_size
        self.embed_tokens = nn.Embedding(V, H, dtype=dtype, device=device)
        nn.init.normal_(self.embed_tokens.weight, 0.0, getattr(config, "initializer_range", 0.02))
        self.rotary_emb = _rotary_class(config)(config=config).to(device)
        self._rotary_table: Optional[tuple[Tensor, Tensor]] = None  # see _rotary
        #: run decode steps as one fused CPU call where :func:`~epikern.models.fused_step.fusable`
        #: allows (False: always the PyTorch path, the reference)
        self.fused_decode = True
        self._fused_dims: Optional[tuple] = None  # fused_step's layout check, done once; _apply resets it
        self.layers = nn.ModuleList(
            StackedDecoderLayer(config, 1 if l < shared_layers else num_drafts, biases, dtype=dtype, device=device)
            for l in range(L)
        )
        self.norm_weight = nn.Parameter(torch.ones(num_drafts, H, dtype=dtype, device=device))
        self.lm_head_weight = nn.Parameter(in_major(
            torch.empty(num_drafts, V, H, dtype=dtype, device=device).normal_(0.0, getattr(config, "initializer_range", 0.02))))

    # ------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_models(cls, models: Sequence[nn.Module], shared_layers: int) -> "DraftEnsemble":
        """Stack K HF causal LMs whose embeddings and first S decoder layers are identical.

        Raises:
            ValueError: no models; an unsupported module layout; architectures that differ (names the
                config field); or a shared tensor that differs (names the first such tensor, e.g.
                ``model.layers.1.self_attn.q_proj.weight``, and the model index).
        """
        models = list(models)
        if not models:
            raise ValueError("from_models needs at least one model")
        first = models[0]
        for i, m in enumerate(models[1:], start=1):
            for field in ARCH_FIELDS:
                a, b = getattr(first.config, field, None), getattr(m.config, field, None)
                if a != b:
                    raise ValueError(f"model {i} has a different architecture: config.{field} = {b!r} vs {a!r} in model 0")
        L = first.config.num_hidden_layers
        if not 0 <= shared_layers <= L:
            raise ValueError(f"shared_layers must be in [0, num_hidden_layers={L}], got {shared_layers}")
        biases = _layer_layout(first)
        for m in models[1:]:
            _layer_layout(m)
        prefix = first.base_model_prefix
        shared = [f"{prefix}.embed_tokens.weight"] + [
            f"{prefix}.layers.{l}.{name}" for l in range(shared_layers) for name, _ in first.get_decoder().layers[l].named_parameters()
        ]
        reference = dict(first.named_parameters(remove_duplicate=False))
        for i, m in enumerate(models[1:], start=1):
            params = dict(m.named_parameters(remove_duplicate=False))
            for name in shared:
                if not torch.equal(params[name], reference[name]):
                    raise ValueError(
                        f"shared tensor {name!r} differs between model {i} and model 0: the embedding and the "
                        f"first shared_layers={shared_layers} decoder layers must be identical"
                    )
        weight = first.get_decoder().embed_tokens.weight
        ens = cls(first.config, len(models), shared_layers, biases, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            ens.embed_tokens.weight.copy_(weight)
            for l, layer in enumerate(ens.layers):
                sources = [m.get_decoder().layers[l] for m in (models[:1] if l < shared_layers else models)]
                for hf_name in LINEARS:
                    weight, bias = layer.projection(hf_name)
                    weight.copy_(torch.stack([s.get_submodule(hf_name).weight for s in sources]))
                    if bias is not None:
                        bias.copy_(torch.stack([s.get_submodule(hf_name).bias for s in sources]))
                for hf_name in NORMS:
                    getattr(layer, layer.norm_name(hf_name)).copy_(torch.stack([s.get_submodule(hf_name).weight for s in sources]))
            ens.norm_weight.copy_(torch.stack([m.get_decoder().norm.weight for m in models]))
            ens.lm_head_weight.copy_(torch.stack([m.get_output_embeddings().weight for m in models]))
        return ens

    @classmethod
    def from_base(cls, model: nn.Module, num_drafts: int, shared_layers: int, seed: int = 0,
                  jitter: float = 0.0) -> "DraftEnsemble":
        """K drafts cloned from one HF causal LM, the starting point of DDD training.

        With ``jitter > 0`` every branch parameter ``W`` (:meth:`branch_parameters`; its rms taken
        over all K drafts) gets i.i.d. Gaussian noise of standard deviation ``jitter · rms(W)``,
        drawn from ``torch.Generator`` seeded with ``seed``; the trunk stays exactly the base model's.
        """
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        ens = cls.from_models([model] * num_drafts, shared_layers)
        if jitter > 0:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in ens.branch_parameters():
                    noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype)
                    p.add_(noise * (jitter * p.float().pow(2).mean().sqrt()).to(p.dtype))
        return ens

    def select(self, drafts: Sequence[int]) -> "DraftEnsemble":
        """A new ensemble of the drafts ``drafts`` (indices into ``0..K-1``, in that order).

        The trunk is shared with ``self`` (the same tensors, not copies); the branch weights are
        gathered along K (copies). ``select([k])`` is draft k alone, a K = 1 ensemble.
        """
        index = list(drafts)
        if not index or any(not 0 <= k < self.num_drafts for k in index):
            raise ValueError(f"drafts must be a non-empty list of indices in [0, {self.num_drafts}), got {index}")
        sub = DraftEnsemble(self.config, len(index), self.shared_layers, self.biases,
                            dtype=self.lm_head_weight.dtype, device="meta")
        sub.rotary_emb = self.rotary_emb
        sub.embed_tokens = self.embed_tokens
        picked = torch.tensor(index, device=self.lm_head_weight.device)
        for l, layer in enumerate(self.layers):
            if l < self.shared_layers:
                sub.layers[l] = layer
                continue
            for name, param in layer.named_parameters():
                rows = param.detach().index_select(0, picked)
                setattr(sub.layers[l], name, nn.Parameter(in_major(rows) if rows.dim() == 3 else rows,
                                                          requires_grad=param.requires_grad))
        sub.norm_weight = nn.Parameter(self.norm_weight.detach().index_select(0, picked))
        sub.lm_head_weight = nn.Parameter(in_major(self.lm_head_weight.detach().index_select(0, picked)))
        return sub.train(self.training)

    def save_pretrained(self, directory: str) -> None:
        """Write ``model.safetensors`` (the trunk once, branches stacked over K) and
        ``draft_ensemble.json`` (format, K, S, biases and the HF config dict of the architecture)."""
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        # format 2 stores fused qkv / gate_up projections; format 1 (unfused) still loads
        meta = {"format": FORMAT, "format_version": 2, "num_drafts": self.num_drafts,
                "shared_layers": self.shared_layers, "biases": sorted(self.biases),
                "config": self.config.to_dict()}
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, directory: str, *, device=None, dtype: Optional[torch.dtype] = None) -> "DraftEnsemble":
        """Load what :meth:`save_pretrained` wrote (weights in their stored dtype unless ``dtype``)."""
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory}/{CONFIG_NAME} is not a {FORMAT} config (format={meta.get('format')!r})")
        arch = dict(meta["config"])
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        state = load_file(os.path.join(directory, WEIGHTS_NAME), device=str(device or "cpu"))
        dtype = dtype or state["embed_tokens.weight"].dtype
        ens = cls(config, meta["num_drafts"], meta["shared_layers"], meta["biases"], dtype=dtype, device=device)
        ens.load_state_dict(state)  # casts to ``dtype``; the rotary tables stay float32 as in HF
        return ens

    # ------------------------------------------------------------------------------------------
    # properties

    @property
    def vocab_size(self) -> int:
        """V, the number of logits per draft."""
        return self.config.vocab_size

    @property
    def num_layers(self) -> int:
        """L, decoder layers per draft."""
        return len(self.layers)

    def trunk_parameters(self) -> Iterator[nn.Parameter]:
        """The shared weights: embedding and layers ``0..S-1`` (frozen in DDD training)."""
        yield from self.embed_tokens.parameters()
        for layer in self.layers[: self.shared_layers]:
            yield from layer.parameters()

    def branch_parameters(self) -> Iterator[nn.Parameter]:
        """The per-draft weights ``[K, ...]``: layers ``S..L-1``, final norm and LM head."""
        for layer in self.layers[self.shared_layers:]:
            yield from layer.parameters()
        yield self.norm_weight
        yield self.lm_head_weight

    # ------------------------------------------------------------------------------------------
    # cache and forward

    def new_cache(self, batch_size: int) -> DraftCache:
        """An empty :class:`DraftCache` for ``batch_size`` rows (S trunk + K·(L−S) branch layers)."""
        return DraftCache(self.num_layers, self.num_drafts, self.shared_layers, batch_size)

    def cache_nbytes(self, cache: DraftCache) -> int:
        """Bytes of KV held by ``cache``: exactly ``(S + K·(L−S))`` layers' worth."""
        self._check_cache(cache, cache.batch_size)
        return cache.nbytes

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, cache: Optional[DraftCache] = None,
                *, position_ids: Optional[Tensor] = None, logits_to_keep: int = 0) -> Tensor:
        """Logits of all K drafts for T new tokens (prefill or incremental decode).

        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, past + T]`` (1 = token, 0 = padding) covering the cached tokens and
                the new ones, as in HF generation; None means no padding.
            cache: a :class:`DraftCache` from :meth:`new_cache`, appended to in place; None runs
                without a cache (training, scoring a whole sequence).
            position_ids: ``[B, T]``; default from ``attention_mask`` (``cumsum − 1``, as HF
                ``generate``) or ``past .. past + T − 1``.
            logits_to_keep: if > 0, only the last ``logits_to_keep`` positions get logits.

        Returns:
            ``[K, B, T', V]`` logits in the weights' dtype (T' = T, or ``logits_to_keep``).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        past = 0
        if cache is not None:
            self._check_cache(cache, B)
            past = cache.get_seq_length()
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask, T)
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        if fusable(self, input_ids, cache, past):
            check_mask_shape(attention_mask, B, past + T, T)
            return fused_forward(self, input_ids, attention_mask, cache, position_ids, logits_to_keep)
        mask, is_causal = causal_mask(attention_mask, B, T, past, self.sliding_window, input_ids.device)
        h = self.embed_tokens(input_ids).unsqueeze(0)
        cos, sin = rotary_tables(*self._rotary(h[0], position_ids, past + T))
        for l, layer in enumerate(self.layers):
            if l == self.shared_layers:
                h = h.expand(self.num_drafts, -1, -1, -1)
                mask = None if mask is None else mask.repeat(self.num_drafts, 1, 1, 1)
            h = layer(h, cos, sin, mask, is_causal, None if cache is None else cache.layers[l])
        h = h.expand(self.num_drafts, -1, -1, -1)
        if logits_to_keep > 0:
            h = h[:, :, -logits_to_keep:]
        h = rms_norm(h, self.norm_weight, self.config.rms_norm_eps)
        return grouped_linear(h, self.lm_head_weight, None)

    def _rotary(self, x: Tensor, position_ids: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """HF's rotary ``cos, sin [B, T, head_dim]`` at ``position_ids`` (``length`` = past + T).

        A static RoPE (every type but HF's dynamic and longrope, which rescale with the sequence
        length) is a function of the position alone, elementwise, so its values are looked up in a
        table the HF module computed for positions ``0 .. max(length, max_position_embeddings) − 1``:
        the same numbers, without recomputing them every decode step.
        """
        rope_type = getattr(self.rotary_emb, "rope_type", None)
        if not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope":
            return self.rotary_emb(x, position_ids)
        cos, sin = self._rotary_table_for(x.dtype, x.device, length)
        return cos[position_ids], sin[position_ids]

    def _rotary_table_for(self, dtype: torch.dtype, device, length: int) -> tuple[Tensor, Tensor]:
        """The static RoPE's ``cos, sin [P, head_dim]`` for positions ``0 .. P − 1``, P ≥ ``length``
        (built once, regrown ×2 when a longer sequence comes)."""
        table = self._rotary_table
        if table is None or table[0].shape[0] < length or table[0].dtype != dtype or table[0].device != device:
            size = max(length, 2 * (0 if table is None else table[0].shape[0]),
                       getattr(self.config, "max_position_embeddings", None) or 0)
            x = torch.zeros(1, 1, device=device, dtype=dtype)  # HF's rotary reads only its dtype and device
            cos, sin = self.rotary_emb(x, torch.arange(size, device=device)[None])
            self._rotary_table = table = (cos[0], sin[0])
        return table

    def _apply(self, fn, recurse=True):
        self._fused_dims = None  # .to(dtype) / .to(device) may change what fused_step accepts
        return super()._apply(fn, recurse)

    def _check_cache(self, cache: DraftCache, batch_size: int) -> None:
        if not isinstance(cache, DraftCache):
            raise TypeError(f"cache must be a DraftCache from DraftEnsemble.new_cache, got {type(cache).__name__}")
        layout = (len(cache.layers), cache.num_drafts, cache.shared_layers)
        if layout != (self.num_layers, self.num_drafts, self.shared_layers) or cache.batch_size != batch_size:
            raise ValueError(
                f"cache (layers, K, S, batch) = {(*layout, cache.batch_size)} does not match this ensemble's "
                f"{(self.num_layers, self.num_drafts, self.shared_layers, batch_size)}"
            )


def _sliding_window(config) -> Optional[int]:
    """The attention window of an all-sliding (Mistral) config, None for full attention.

    Configs mixing full and sliding layers (``layer_types``) are not supported.
    """
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"DraftEnsemble supports full-attention layers only, got layer_types={layer_types}")
        return None
    return getattr(config, "sliding_window", None)


def _rotary_class(config) -> type:
    """The ``<Arch>RotaryEmbedding`` module class of the HF causal LM for ``config``."""
    try:
        module = sys.modules[MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__module__]
    except KeyError as exc:
        raise ValueError(f"no HF causal LM is registered for config {type(config).__name__}") from exc
    found = [v for k, v in vars(module).items() if k.endswith("RotaryEmbedding") and isinstance(v, type)]
    if len(found) != 1:
        raise ValueError(f"{module.__name__} has {len(found)} rotary embedding classes; expected exactly one")
    return found[0]


def _layer_layout(model: nn.Module) -> frozenset:
    """Check ``model`` is a Llama-family causal LM this module can stack; return its biased projections."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise ValueError(f"{type(model).__name__} is not a Llama-family causal LM (embed_tokens, layers, norm, rotary_emb)")
    _sliding_window(model.config)
    allowed = {f"{n}.weight" for n in LINEARS + NORMS} | {f"{n}.bias" for n in LINEARS}
    layouts = set()
    for l, layer in enumerate(decoder.layers):
        names = {name for name, _ in layer.named_parameters()}
        if names - allowed or not {f"{n}.weight" for n in LINEARS + NORMS} <= names:
            raise ValueError(
                f"unsupported decoder layer layout in {type(model).__name__} layer {l}: unexpected "
                f"{sorted(names - allowed)}, missing {sorted({f'{n}.weight' for n in LINEARS + NORMS} - names)}"
            )
        layouts.add(frozenset(n.removesuffix(".bias") for n in names if n.endswith(".bias")))
    if len(layouts) != 1:
        raise ValueError(f"the layers of {type(model).__name__} differ in which projections have biases")
    if model.get_output_embeddings().bias is not None:
        raise ValueError("LM heads with a bias are not supported")
    return layouts.pop()
