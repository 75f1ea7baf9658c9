"""``ek.TokUR``: token-level uncertainty from TokUR's perturbation ensemble of the target (design §5).

M = ``num_samples`` members, **one of them the clean model** and M − 1 perturbed by
:class:`~epikern.models.perturb.Perturbation` (q/v noise ``σ‖x‖ U_r ε``), all in one batch of M·B
rows with clean-KV semantics. Per token, through the fused :func:`epikern.ensemble_uncertainty`:
``total = H(p̄)``, ``aleatoric = mean_m H(p_m)``, ``epistemic = total − aleatoric`` (the mutual
information; TokUR's EU). The text is the clean model's. The benchmark's ground-truth EU (design §1)
is the same estimator with more members: ``tokur.with_samples(32, seed=...)`` shares the SVD bases.

Alignment as :class:`~epikern.models.estimator.DraftEstimator`: position t scores the next-token
distribution after token t; ``generate(...).uncertainty[:, j]`` is ``score(sequences)[:, T0 - 1 + j]``.

**Noise.** ε is a fixed function of ``(seed, num_samples, column)``: the noise of the token in column
c of the input (all layers, members and rows at once) is drawn from a generator seeded by
``SeedSequence((seed, num_samples, c))``. Every token, layer, member and row gets its own draw, and
``generate`` and ``score`` of the same sequences use the same noise, so they agree to float
round-off; repeated calls are reproducible. Estimators that must be independent (TokUR and the
ground truth) take different seeds.

**Cost.** ≈ M target forwards per scored token (one batched forward of M·B rows per step or chunk;
a prompt costs one clean forward in ``generate``), reported after each call in :attr:`TokUR.last_cost`.
Memory: the logits of one chunk, ``M·B·chunk·V``; ``score`` picks the chunk so that this stays
within ``max_chunk_logits`` (default 2²⁷ values, 512 MiB in float32), e.g. 85 tokens for M = 32,
B = 1, V = 49152, so the ground truth needs no more memory than TokUR, only more time.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from transformers import DynamicCache

from ..ops import EnsembleUncertainty, ensemble_uncertainty
from .decoding import Sampler, Transcript, prepare, stop_at_eos
from .hf import lm_logits
from .masks import nan_where_not, position_ids_from_mask
from .perturb import Perturbation


class TokURGeneration(NamedTuple):
    """What :meth:`TokUR.generate` returns (N ≤ ``max_new_tokens`` generated tokens)."""

    sequences: Tensor  #: [B, T0 + N] prompt then generated ids (pad after a row's eos)
    uncertainty: EnsembleUncertainty  #: fields [B, N]; NaN after a row's eos
    generated_mask: Tensor  #: [B, N] bool, True for generated tokens up to and including eos


class ForwardCost(NamedTuple):
    """Target compute of one :meth:`TokUR.score` / :meth:`TokUR.generate` call."""

    forwards: int  #: calls of the target model (each one batch)
    token_rows: int  #: Σ rows × new tokens over those calls: single-token target forwards
    scored_tokens: int  #: B × positions that got an uncertainty

    @property
    def forwards_per_token(self) -> float:
        """Target-forward equivalents per scored token (≈ M; ``generate`` adds its prompt)."""
        return self.token_rows / max(self.scored_tokens, 1)


class TokUR:
    """TokUR (as its public code does it): the clean target plus M − 1 perturbed members.

    Args:
        target: a Llama-family HF causal LM (see :class:`~epikern.models.perturb.Perturbation`).
        rank: r of the perturbation subspace (top-r left singular vectors of q_proj / v_proj).
        sigma: σ of the noise; σ = 0 makes every member the clean model (epistemic = 0).
        num_samples: M ≥ 2 members including the clean pass (TokUR: 10; ground truth: 32).
        seed: the noise seed (see the module docstring).
        eu_temperature: temperature of every member's distribution in the uncertainty.
        max_chunk_logits: bound on ``M·B·chunk·V`` in :meth:`score`.
        backend: backend of :func:`epikern.ensemble_uncertainty`.
        perturbation: an existing :class:`Perturbation` of ``target`` to share (its rank and
            sigma then apply; ``rank``/``sigma`` must be left at None).
    """

    def __init__(self, target: nn.Module, rank: Optional[int] = 8, sigma: Optional[float] = 0.1,
                 num_samples: int = 10, *, seed: int = 0, eu_temperature: float = 1.0,
                 max_chunk_logits: int = 2 ** 27, backend: Optional[str] = None,
                 perturbation: Optional[Perturbation] = None):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"num_samples must be an int >= 2 (the clean pass and at least one perturbed "
                             f"member), got {num_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if isinstance(max_chunk_logits, bool) or not isinstance(max_chunk_logits, int) or max_chunk_logits < 1:
            raise ValueError(f"max_chunk_logits must be an int >= 1, got {max_chunk_logits!r}")
        if perturbation is None:
            perturbation = Perturbation(target, 8 if rank is None else rank, 0.1 if sigma is None else sigma)
        elif perturbation.model is not target:
            raise ValueError("perturbation must perturb target itself (a Perturbation of another model was given)")
        elif (rank, sigma) != (None, None) and (rank, sigma) != (perturbation.rank, perturbation.sigma):
            raise ValueError(f"rank={rank!r}, sigma={sigma!r} disagree with the given perturbation's "
                             f"rank={perturbation.rank}, sigma={perturbation.sigma}; pass rank=None, sigma=None")
        self.target, self.perturbation = target, perturbation
        self.num_samples, self.seed = num_samples, seed
        self.eu_temperature, self.max_chunk_logits, self.backend = eu_temperature, max_chunk_logits, backend
        self.last_cost: Optional[ForwardCost] = None

    def with_samples(self, num_samples: int, *, seed: int) -> "TokUR":
        """The same perturbation (no new SVD) with another ensemble size and seed, e.g. the ground
        truth ``tokur.with_samples(32, seed=1)``."""
        return TokUR(self.target, None, None, num_samples, seed=seed, eu_temperature=self.eu_temperature,
                     max_chunk_logits=self.max_chunk_logits, backend=self.backend, perturbation=self.perturbation)

    def noise(self, start: int, stop: int, batch: int, device=None) -> Tensor:
        """ε of the tokens in columns ``start..stop-1``: ``[L, 2, M − 1, B, stop − start, r]`` float32,
        one seeded draw of ``[L, 2, M − 1, B, r]`` per column."""
        shape = self.perturbation.noise_shape(self.num_samples - 1, batch, 1)
        shape = shape[:4] + shape[5:]
        draws = [torch.randn(shape, generator=torch.Generator().manual_seed(self._column_seed(c)))
                 for c in range(start, stop)]
        eps = torch.stack(draws, dim=4) if draws else torch.empty(shape[:4] + (0,) + shape[4:])
        return eps.to(self.perturbation.basis_q_proj.device if device is None else device)

    def _column_seed(self, column: int) -> int:
        state = np.random.SeedSequence((self.seed, self.num_samples, column)).generate_state(2, np.uint32)
        return int(state[0]) << 31 | int(state[1]) >> 1  # 62 bits, inside torch's seed range

    def chunk_size(self, batch: int) -> int:
        """Tokens per forward in :meth:`score`: the most with ``M·B·chunk·V ≤ max_chunk_logits``."""
        vocab = self.target.config.vocab_size
        return max(1, self.max_chunk_logits // (self.num_samples * batch * vocab))

    @torch.no_grad()
    def score(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, start: int = 0
              ) -> EnsembleUncertainty:
        """Per-token uncertainty of a given sequence (teacher forcing).

        Args:
            input_ids: ``[B, T]``; attention_mask: ``[B, T]`` (0 = padding, left padding) or None.
            start: score positions ``start..T-1`` only; the columns before are run once by the clean
                model into its cache (their members would not change the later ones: each member sees
                the clean prefix), e.g. ``start = T0 − 1`` scores just the distributions of a
                response after a T0-column prompt at about ``(T − start)/T`` of the cost.

        Returns:
            :class:`~epikern.EnsembleUncertainty` with ``[B, T]`` fields (float32, nats); position t
            scores the next-token distribution after token t; padding positions and positions
            before ``start`` are NaN.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < max(T, 1):
            raise ValueError(f"start must be an int in [0, T={T}), got {start!r}")
        step = self.chunk_size(B)
        cache = DynamicCache(config=self.target.config) if start > 0 or step < T - start else None
        parts, rows = [], 0
        if start > 0:  # the clean prefix, P = 0 perturbed members
            prefix = None if attention_mask is None else attention_mask[:, :start]
            none = torch.empty(self.perturbation.noise_shape(0, B, start), device=input_ids.device)
            self.perturbation(input_ids[:, :start], prefix, cache=cache, logits_to_keep=1, noise=none)
            rows += B * start
            nan = torch.full((B, start), float("nan"), device=input_ids.device)
            parts.append(EnsembleUncertainty(nan, nan, nan))
        for begin in range(start, T, step):
            stop = min(T, begin + step)
            mask = None if attention_mask is None else attention_mask[:, :stop]
            logits = self.perturbation(input_ids[:, begin:stop], mask, cache=cache,
                                       noise=self.noise(begin, stop, B, input_ids.device))
            parts.append(self._uncertainty(logits))
            rows += self.num_samples * B * (stop - begin)
        self.last_cost = ForwardCost(len(parts), rows, B * (T - start))
        if not parts:
            nan = torch.full((B, 0), float("nan"), device=input_ids.device)
            return EnsembleUncertainty(nan, nan, nan)
        u = EnsembleUncertainty(*(torch.cat(field, dim=-1) for field in zip(*parts)))
        return u if attention_mask is None else nan_where_not(u, attention_mask.bool())

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0,
                 eos_token_id: Union[None, int, Sequence[int]] = None,
                 generator: Optional[torch.Generator] = None) -> TokURGeneration:
        """Decode with the clean target; every step is one forward of the M members on the new token.

        The prompt except its last token is prefilled by the clean model alone (its cache holds
        clean K/V only, ever); then each step runs the clean model and the M − 1 perturbed members
        on the newest token in one batch of M·B rows, takes the next token from the clean member,
        and scores the step with one :func:`epikern.ensemble_uncertainty` call.

        Args:
            input_ids: ``[B, T0]`` prompts (T0 ≥ 1), left-padded if their lengths differ.
            attention_mask: ``[B, T0]`` (0 = padding) or None.
            max_new_tokens: N ≥ 0.
            do_sample: sample from ``softmax(clean_logits / temperature)``; else greedy (argmax).
            temperature: sampling temperature (> 0), used only with ``do_sample``.
            eos_token_id: id(s) ending a row; later tokens of that row are the target's
                ``pad_token_id`` (or the first eos id) and their uncertainty is NaN.
            generator: random generator for sampling (the perturbation noise is seeded by ``seed``).
        """
        batch = prepare(input_ids, attention_mask, max_new_tokens, eos_token_id, None, self.target.config)
        sampler = Sampler(do_sample, temperature, generator)
        B, T0 = input_ids.shape
        device = input_ids.device
        cache = DynamicCache(config=self.target.config)
        forwards, rows = 0, 0
        if T0 > 1 and max_new_tokens > 0:
            prefix = batch.mask[:, :-1]
            lm_logits(self.target, input_ids[:, :-1], prefix, position_ids_from_mask(prefix, T0 - 1), cache, 1)
            forwards, rows = 1, B * (T0 - 1)
        mask, finished, transcript = batch.mask, torch.zeros(B, dtype=torch.bool, device=device), Transcript()
        step_ids, column = input_ids[:, -1:], T0 - 1
        for _ in range(max_new_tokens):
            logits = self.perturbation(step_ids, mask, cache=cache,
                                       noise=self.noise(column, column + 1, B, device))[:, :, -1]  # [M, B, V]
            forwards, rows = forwards + 1, rows + self.num_samples * B
            u = self._uncertainty(logits)
            emitted = stop_at_eos(sampler.pick(logits[0])[:, None], finished, batch.eos, batch.pad)  # the clean member
            transcript.add(emitted, type(u)(*(field[:, None] for field in u)))
            if emitted.done:
                break
            step_ids, column, finished = emitted.tokens, column + 1, emitted.finished
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        self.last_cost = ForwardCost(forwards, rows, B * len(transcript.scores))
        nan = torch.full((B, 0), float("nan"), device=device)
        sequences, generated_mask, u = transcript.finish(input_ids, EnsembleUncertainty(nan, nan, nan))
        return TokURGeneration(sequences, u, generated_mask)

    def _uncertainty(self, member_logits: Tensor) -> EnsembleUncertainty:
        return ensemble_uncertainty(member_logits, temperature=self.eu_temperature, backend=self.backend)
