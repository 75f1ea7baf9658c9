"""TokUR's weight-space perturbation of an HF causal LM, with members folded into the batch (design §5).

On the ``q_proj`` and ``v_proj`` of every decoder layer a perturbed member computes

    y = W x + b + σ ‖x‖₂ U_r ε,        ε ~ N(0, I_r) fresh per token row, per layer, per pass,

where ``U_r [out, r]`` holds the top-r left singular vectors of ``W`` (one float64 SVD per weight, at
construction, kept as float32 buffers). Given ``x``, the noise is Gaussian with mean 0 and
covariance ``σ² ‖x‖² U_r U_rᵀ``.

**Clean-KV semantics.** A member never sees another member's (or its own) perturbed past: the KV
cache holds the clean model's keys and values, and a perturbed member at position t attends to the
clean K/V at every earlier position plus its *own* key and value at t. So member m's distribution at
t is what one gets by decoding the clean model up to t − 1 and running member m on token t alone.

**One batch.** A call runs ``R = (1 + P)·B`` rows: the B clean rows first, then P perturbed members
of B rows each (member-major: row ``B + p·B + b`` is member p of sequence b). Forward hooks on the
projections add the noise to the perturbed rows only (registered for the duration of the call, then
removed), and the model's attention implementation is switched for that call to
:func:`clean_kv_attention`, which gives the clean rows ordinary causal attention (storing their new
K/V in the cache, if any) and the perturbed rows the clean past plus their own current token — so a
whole teacher-forced sequence is one forward, not T decode steps, and never a loop over members.

**Cost.** Time ≈ ``1 + P`` target forwards over the new tokens (the clean rows run once even when
only perturbed members are returned). Memory: activations and logits of R rows
(``R·T·V`` logits), attention scores ``R·heads·T·(past + 2T)`` (a perturbed query sees the clean
keys and its own T new keys, of which one is unmasked: O(T²) per member and layer), and a transient
copy of the clean keys/values per perturbed member and layer. Score long sequences in chunks through
a cache (``cache=``) to bound both; chunked and whole-sequence results are the same numbers.

    pert = Perturbation(model, rank=8, sigma=0.1)                  # SVD once
    logits = pert.member_logits(ids, mask, num_members=10)         # [10, B, T, V], member 0 clean
    teacher = pert.member_logits(ids, mask, num_members=1, include_clean=False)[0]   # OSD
    cache = DynamicCache(config=model.config)                      # decode: clean K/V only
    step = pert(ids, mask, cache=cache, noise=pert.sample_noise(9, B, T))            # [10, B, T, V]
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .masks import causal_mask, position_ids_from_mask

#: The perturbed projections of every decoder layer's ``self_attn`` (design §5).
PROJECTIONS = ("q_proj", "v_proj")
#: Name under which :func:`clean_kv_attention` is registered with ``transformers.AttentionInterface``.
ATTENTION = "epikern_clean_kv"
#: Keyword through which a forward hands its :class:`_CleanKV` state to the attention function.
STATE_KEYWORD = "epikern_clean_kv"


@dataclass
class _CleanKV:
    """What :func:`clean_kv_attention` needs about the current forward (one per call)."""

    clean_rows: int  #: B, the leading clean rows of the R-row batch
    past: int  #: number of cached columns before the new tokens
    padding: Tensor  #: [B, past + T] bool, True = real token
    cache: Optional[Cache]  #: the clean model's cache (updated with the clean rows only), or None
    masks: dict = field(default_factory=dict)  #: (S, window) -> (allowed, own), shared across layers


def clean_kv_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Optional[Tensor], scaling: Optional[float] = None,
                       dropout: float = 0.0, **kwargs):
    """``transformers`` attention function with clean-KV semantics for perturbed member rows.

    ``query [R, heads, T, d]``, ``key``/``value [R, kv_heads, T, d]`` hold the T new tokens of
    ``R = (1 + P)·B`` rows (clean rows first). The clean rows attend causally to the clean cache
    plus their new keys (which go into the cache); the rows of perturbed member p attend to the
    clean keys/values at earlier columns and to their own key/value at the same column. HF's
    ``attention_mask`` is not used (the padding mask comes with the state). Without a state (a call
    outside :class:`Perturbation`) this is plain SDPA attention.

    Returns ``([R, T, heads, d], None)`` like every HF attention function.
    """
    state: Optional[_CleanKV] = kwargs.pop(STATE_KEYWORD, None)
    if state is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    B, T = state.clean_rows, query.shape[2]
    members = query.shape[0] // B - 1
    gqa = query.shape[1] != key.shape[1]
    clean_keys, clean_values = key[:B], value[:B]
    if state.cache is not None:
        clean_keys, clean_values = state.cache.update(clean_keys, clean_values, module.layer_idx)
    allowed, own = _masks(state, clean_keys.shape[2], kwargs.get("sliding_window"), T, query.device)
    out = F.scaled_dot_product_attention(query[:B], clean_keys, clean_values, attn_mask=allowed,
                                         scale=scaling, enable_gqa=gqa)
    if members:
        # Member rows: keys = [clean keys (all cached/new columns); own new keys], with the mask
        # "clean and strictly earlier" on the first block and "same column" on the second.
        keys = torch.cat([clean_keys.repeat(members, 1, 1, 1), key[B:]], dim=2)
        values = torch.cat([clean_values.repeat(members, 1, 1, 1), value[B:]], dim=2)
        eye = torch.eye(T, dtype=torch.bool, device=query.device).expand(B, 1, T, T)
        mask = torch.cat([allowed & ~own, eye], dim=-1).repeat(members, 1, 1, 1)
        perturbed = F.scaled_dot_product_attention(query[B:], keys, values, attn_mask=mask, scale=scaling,
                                                   enable_gqa=gqa)
        out = torch.cat([out, perturbed], dim=0)
    return out.transpose(1, 2).contiguous(), None


def _masks(state: _CleanKV, keys: int, window: Optional[int], T: int, device) -> tuple[Tensor, Tensor]:
    """``allowed [B, 1, T, S]`` (causal, window, padding; plus the query's own column, so that a
    padding query attends to something) and ``own [T, S]`` (key column == query column) for the S
    clean keys, which are the last S of the ``past + T`` columns (a sliding-window cache keeps fewer)."""
    cached = state.masks.get((keys, window))
    if cached is None:
        B, end = state.clean_rows, state.past + T
        allowed, _ = causal_mask(state.padding, B, T, state.past, window, device)
        allowed = allowed[..., end - keys:]
        own = torch.arange(end - keys, end, device=device) == torch.arange(state.past, end, device=device)[:, None]
        cached = state.masks[(keys, window)] = (allowed | own, own)
    return cached


AttentionInterface.register(ATTENTION, clean_kv_attention)


class Perturbation(nn.Module):
    """TokUR's perturbation of ``model`` (design §5): P perturbed members and the clean pass in one batch.

    Args:
        model: a Llama-family HF causal LM (Llama, SmolLM2, Mistral, Qwen2, ...): decoder layers at
            ``model.get_decoder().layers``, each with ``self_attn.q_proj``/``v_proj`` ``nn.Linear``.
            It is referenced, not owned: ``state_dict()`` and ``to()`` cover only the bases.
        rank: r, 1 ≤ r ≤ min(out, in) of every perturbed weight.
        sigma: σ ≥ 0 (σ = 0: every member is the clean model).

    Buffers: ``basis_q_proj [L, out_q, r]`` and ``basis_v_proj [L, out_v, r]`` (float32), the top-r
    left singular vectors of each layer's weight, in decreasing order of singular value.
    """

    def __init__(self, model: nn.Module, rank: int = 8, sigma: float = 0.1):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if layers is None or len(layers) == 0:
            raise TypeError(f"{type(model).__name__} has no decoder layers at model.get_decoder().layers")
        projections = []
        for i, layer in enumerate(layers):
            row = [getattr(getattr(layer, "self_attn", None), name, None) for name in PROJECTIONS]
            if not all(isinstance(p, nn.Linear) for p in row):
                raise TypeError(f"layer {i} of {type(model).__name__} lacks nn.Linear self_attn.{PROJECTIONS}")
            projections.append(row)
        smallest = min(min(p.weight.shape) for row in projections for p in row)
        if rank > smallest:
            raise ValueError(f"rank={rank} exceeds min(out, in) = {smallest} of the perturbed q_proj/v_proj weights")
        object.__setattr__(self, "model", model)  # a reference, not a submodule
        self._projections = projections
        self.rank, self.sigma = rank, float(sigma)
        with torch.no_grad(), tqdm(total=2 * len(layers), desc="TokUR bases (SVD)", disable=None, leave=False) as bar:
            for j, name in enumerate(PROJECTIONS):
                bases = []
                for row in projections:
                    bases.append(top_left_singular_vectors(row[j].weight, rank))
                    bar.update()
                self.register_buffer(f"basis_{name}", torch.stack(bases))

    @property
    def num_layers(self) -> int:
        return len(self._projections)

    def basis(self, layer: int, projection: str) -> Tensor:
        """``U_r [out, r]`` of ``layer``'s ``projection`` (``"q_proj"`` or ``"v_proj"``)."""
        return getattr(self, f"basis_{projection}")[layer]

    def noise_shape(self, num_perturbed: int, batch: int, length: int) -> tuple[int, ...]:
        """Shape of ε for P members, B rows and T tokens: ``[L, 2 (q, v), P, B, T, r]``."""
        return (self.num_layers, len(PROJECTIONS), num_perturbed, batch, length, self.rank)

    def sample_noise(self, num_perturbed: int, batch: int, length: int, *,
                     generator: Optional[torch.Generator] = None, device=None) -> Tensor:
        """Fresh float32 ε ~ N(0, I) of :meth:`noise_shape`, drawn on ``generator``'s device (or
        ``device``) from ``generator`` (default: torch's global RNG), then moved to ``device``."""
        device = self.basis_q_proj.device if device is None else torch.device(device)
        where = generator.device if generator is not None else device
        eps = torch.randn(self.noise_shape(num_perturbed, batch, length), generator=generator, device=where)
        return eps.to(device)

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, noise: Tensor,
                cache: Optional[Cache] = None, position_ids: Optional[Tensor] = None,
                logits_to_keep: int = 0) -> Tensor:
        """One batched forward of the clean model and P perturbed members on T new tokens.

        Prefill, decode step and chunked scoring are all this call: the perturbed members see the
        clean K/V of ``cache`` (the clean past), the clean K/V of the new tokens before theirs, and
        their own current token; ``cache`` (a ``DynamicCache`` of the clean model, or None for a
        whole sequence) receives the clean K/V of the new tokens only.

        Args:
            input_ids: ``[B, T]`` new tokens (left-padded rows allowed).
            attention_mask: ``[B, past + T]`` (0 = padding) over the cached and new tokens, or None.
            noise: ε of shape :meth:`noise_shape` ``[L, 2, P, B, T, r]``; P = 0 runs the clean model only.
            cache: the clean model's cache holding ``past`` tokens, or None (past = 0).
            position_ids: ``[B, T]``; default ``position_ids_from_mask`` (as HF ``generate``), or
                ``past + arange(T)`` without a mask.
            logits_to_keep: as HF: 0 = all T positions, n = the last n.

        Returns:
            logits ``[1 + P, B, T', V]`` (T' = T, or ``logits_to_keep``); member 0 is the clean model.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        past = 0 if cache is None else cache.get_seq_length()
        if not isinstance(noise, Tensor) or not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor, got {getattr(noise, 'dtype', type(noise))}")
        if noise.dim() != 6 or tuple(noise.shape) != self.noise_shape(noise.shape[2], B, T):
            raise ValueError(f"noise must be [L, 2, P, B, T, r] = [{self.num_layers}, 2, P, {B}, {T}, {self.rank}], "
                             f"got {tuple(noise.shape)}")
        if attention_mask is None:
            padding = torch.ones(B, past + T, dtype=torch.bool, device=input_ids.device)
        elif tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(f"attention_mask must be [B, past + T] = [{B}, {past + T}] (past {past}), "
                             f"got {tuple(attention_mask.shape)}")
        else:
            padding = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        if position_ids is None:
            position_ids = position_ids_from_mask(padding, T)
        rows = 1 + noise.shape[2]
        state = _CleanKV(clean_rows=B, past=past, padding=padding, cache=cache)
        with self._active(B, noise.to(device=input_ids.device, dtype=torch.float32)):
            out = self.model(input_ids=input_ids.repeat(rows, 1), position_ids=position_ids.repeat(rows, 1),
                             use_cache=False, logits_to_keep=logits_to_keep, **{STATE_KEYWORD: state})
        logits = out.logits
        return logits.view(rows, B, *logits.shape[1:])

    @torch.no_grad()
    def member_logits(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, num_members: int,
                      include_clean: bool = True, generator: Optional[torch.Generator] = None,
                      noise: Optional[Tensor] = None) -> Tensor:
        """Teacher-forced logits of M members over a whole sequence, with clean-KV semantics.

        Args:
            input_ids: ``[B, T]``; attention_mask: ``[B, T]`` (0 = padding, left padding) or None.
            num_members: M ≥ 1.
            include_clean: member 0 is the clean model and M − 1 are perturbed; with False all M are
                perturbed (the clean rows still run, for their K/V, but are not returned). M = 1 with
                False is one perturbed teacher, fresh noise each call (OSD).
            generator: the RNG of the fresh noise (default: torch's global RNG).
            noise: explicit ε ``[L, 2, P, B, T, r]`` (P perturbed members) instead of fresh noise.

        Returns:
            ``[M, B, T, V]`` logits; position t is the next-token distribution after token t.
        """
        if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
            raise ValueError(f"num_members must be an int >= 1, got {num_members!r}")
        perturbed = num_members - 1 if include_clean else num_members
        B, T = input_ids.shape
        if noise is None:
            noise = self.sample_noise(perturbed, B, T, generator=generator, device=input_ids.device)
        elif noise.dim() != 6 or noise.shape[2] != perturbed:
            raise ValueError(f"noise must hold P = {perturbed} perturbed members in dim 2 "
                             f"(num_members={num_members}, include_clean={include_clean}), got {tuple(noise.shape)}")
        logits = self(input_ids, attention_mask, noise=noise)
        return logits if include_clean else logits[1:]

    @contextlib.contextmanager
    def _active(self, clean_rows: int, noise: Tensor):
        """Noise hooks on every perturbed projection and the clean-KV attention, for one call."""
        config = self.model.config
        previous = config._attn_implementation
        handles = []
        try:
            for l, row in enumerate(self._projections):
                for j, (name, proj) in enumerate(zip(PROJECTIONS, row)):
                    hook = _NoiseHook(self.basis(l, name), noise[l, j], self.sigma, clean_rows)
                    # prepend: any hook of the caller sees the perturbed output
                    handles.append(proj.register_forward_hook(hook, prepend=True))
            config._attn_implementation = ATTENTION
            yield
        finally:
            config._attn_implementation = previous
            for handle in handles:
                handle.remove()


class _NoiseHook:
    """Forward hook adding ``σ ‖x‖₂ U_r ε`` to the perturbed rows ``[B:]`` of a projection's output."""

    def __init__(self, basis: Tensor, eps: Tensor, sigma: float, clean_rows: int):
        self.basis, self.sigma, self.clean_rows = basis, sigma, clean_rows
        self.eps = eps.flatten(0, 1)  # [P, B, T, r] -> [P·B, T, r], member-major like the rows

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        x = inputs[0][self.clean_rows:]
        if x.shape[0] == 0:
            return output
        scale = self.sigma * torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)  # [P·B, T, 1]
        noise = scale * (self.eps @ self.basis.T)  # [P·B, T, out], float32
        return torch.cat([output[:self.clean_rows], output[self.clean_rows:] + noise.to(output.dtype)])


def top_left_singular_vectors(weight: Tensor, rank: int) -> Tensor:
    """``U_r [out, r]`` (float32): the left singular vectors of ``weight [out, in]`` for its r largest
    singular values, from one float64 ``torch.linalg.svd``."""
    U, _, _ = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    return U[:, :rank].to(torch.float32).contiguous()
