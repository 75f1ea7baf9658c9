"""Measure speculative decoding with EU against plain target decoding: the variants, their timing in
interleaved rounds (:mod:`epikern.eval.timing`) and what each produced, as typed results.

Greedy decoding, batch 1, every variant generates exactly ``new_tokens`` tokens per prompt (no eos);
tokens/s is (prompts × new tokens) ÷ the median wall time of decoding all prompts. The variants
(:class:`Variant`):

* ``hf``: the target's own ``generate(do_sample=False)`` — the anchor;
* ``plain`` / ``plain+EU``: :meth:`~epikern.DraftEstimator.generate` with γ = 0, EU off / on (with EU
  the drafts shadow the target only to score it);
* per γ: ``spec`` / ``spec+EU`` (speculative, EU off / on every emitted token), ``spec K=1`` (draft 0
  alone as a one-draft ensemble, EU off) and ``assisted`` (transformers'
  ``generate(assistant_model=draft 0)`` with γ candidate tokens a round — the one-draft anchor);
* per γ ≥ 2 and τ > 0, the adaptive rounds ``spec τ`` / ``spec+EU τ``: γ at most, a round ends after
  a proposal with q(y) < τ.
"""

from __future__ import annotations

from ..extras import require

require("eval", __name__)

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from transformers import DynamicCache

from ..models import DraftEnsemble, DraftEstimator
from ..models.hf import hf_cache_keyword, lm_logits
from .cost import draft_ensemble_flops_per_token, lm_flops_per_token, mean_decode_context
from .speculative_models import draft_as_hf, single_draft
from .speculative_verdict import plain_tokens_per_s, spec7_verdict
from .timing import Case, interleaved_medians, timed_call

__all__ = ["GAMMAS", "CONFIDENCE", "Variant", "Rounds", "VariantRow", "EUShare", "StepCosts", "SpeculativeResult",
           "variants", "measure", "step_runners", "eu_calls_s"]

GAMMAS = (1, 2, 4, 8)
#: τ of the adaptive variants: of 0.3 / 0.5 / 0.7 / 0.9, the best for the tiny DDD drafts at γ = 4 and
#: within 4 % of the best (0.9) at γ = 8 (benchmarks/RESULTS.md); transformers' assisted generation uses 0.4.
CONFIDENCE = 0.7
KINDS = ("hf", "plain", "spec", "assisted")


@dataclass(frozen=True)
class Variant:
    """One decoder of the comparison (module docstring).

    Attributes:
        kind: ``"hf"``, ``"plain"`` (γ = 0), ``"spec"`` (speculative) or ``"assisted"``.
        gamma: proposals a round (0 for ``hf`` and ``plain``).
        eu: EU computed for every emitted token.
        single_draft: draft 0 alone (a K = 1 ensemble) instead of all K drafts.
        confidence: τ of adaptive rounds (a round ends after a proposal with q(y) < τ); 0: fixed γ.
    """

    kind: str
    gamma: int = 0
    eu: bool = False
    single_draft: bool = False
    confidence: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if (self.gamma > 0) != (self.kind in ("spec", "assisted")):
            raise ValueError(f"a {self.kind} variant with gamma={self.gamma}: only spec and assisted have γ > 0")

    @property
    def label(self) -> str:
        """The variant without γ, e.g. ``"spec+EU τ=0.7"``."""
        return (self.kind + ("+EU" if self.eu else "") + (" K=1" if self.single_draft else "")
                + (f" τ={self.confidence}" if self.confidence else ""))

    @property
    def name(self) -> str:
        """The label with γ, e.g. ``"spec+EU τ=0.7 γ=4"``."""
        return self.label + (f" γ={self.gamma}" if self.gamma else "")

    @property
    def runs_all_drafts(self) -> bool:
        """The K drafts propose (speculative rounds with the whole ensemble)."""
        return self.kind == "spec" and not self.single_draft


@dataclass(frozen=True)
class Rounds:
    """What epikern's decoding loop reports for a variant, summed over the prompts."""

    acceptance: Optional[float]  #: accepted ÷ proposed (None: nothing proposed)
    tokens_per_round: float  #: tokens emitted per target forward
    rounds: int
    draft_forwards: int
    round_ms: float  #: median wall time ÷ rounds


@dataclass
class VariantRow:
    """A variant's measured speed and what it produced."""

    variant: Variant
    tokens_per_s: float
    seconds: float  #: median wall time of decoding every prompt
    speedup: float  #: over ``hf``
    same_tokens: bool  #: the same tokens as ``hf`` on every prompt
    rounds: Optional[Rounds] = None  #: epikern's decoders only
    draft_flops_vs_target: Optional[float] = None  #: speculative rows: drafts that ran ÷ target, FLOPs a token
    spec7: Optional[str] = None  #: speculative rows: :func:`~epikern.eval.speculative_verdict.spec7_verdict`

    @property
    def tokens_per_round(self) -> Optional[float]:
        return None if self.rounds is None else self.rounds.tokens_per_round

    def to_json(self) -> dict:
        """A flat dict: ``variant`` (the label), ``gamma``, the measurements, then the variant's fields."""
        out: dict[str, Any] = {"variant": self.variant.label, "gamma": self.variant.gamma,
                               "tokens_per_s": self.tokens_per_s, "seconds": self.seconds, "speedup": self.speedup,
                               "same_tokens": self.same_tokens}
        if self.rounds is not None:
            out.update(asdict(self.rounds))
        if self.draft_flops_vs_target is not None:
            out["draft_flops_vs_target"] = self.draft_flops_vs_target
        if self.spec7 is not None:
            out["spec7"] = self.spec7
        v = self.variant
        out.update(kind=v.kind, eu=v.eu, single_draft=v.single_draft, confidence=v.confidence)
        return out

    @classmethod
    def from_json(cls, d: dict) -> "VariantRow":
        rounds = Rounds(**{f: d[f] for f in Rounds.__dataclass_fields__}) if "rounds" in d else None
        return cls(Variant(d["kind"], d["gamma"], d["eu"], d["single_draft"], d["confidence"]), d["tokens_per_s"],
                   d["seconds"], d["speedup"], d["same_tokens"], rounds, d.get("draft_flops_vs_target"), d.get("spec7"))


@dataclass(frozen=True)
class EUShare:
    """EU's share of a round at one γ (0: plain decoding, where the drafts run only for EU)."""

    share_from_medians: float  #: (t_EU − t_noEU) ÷ t_EU from the variants' medians
    share_of_call: float  #: median uncertainty call in situ ÷ a round (EU on)
    round_ms: float
    eu_call_ms: float
    eu_calls: int


@dataclass(frozen=True)
class StepCosts:
    """ms of each :func:`step_runners` piece, and the round time they predict per γ."""

    ms: dict[str, float]
    predicted_round_ms: dict[int, float]  #: γ·draft_1 + target_{γ+1}


@dataclass
class SpeculativeResult:
    """Everything :func:`measure` found; :meth:`to_json` / :meth:`from_json` round-trip it."""

    rows: list[VariantRow]
    eu: dict[int, EUShare]
    steps: StepCosts
    config: dict = field(default_factory=dict)

    def row(self, variant: Variant) -> VariantRow:
        return next(r for r in self.rows if r.variant == variant)

    def to_json(self) -> dict:
        """Strict JSON: the γ keys as strings."""
        return {"rows": [r.to_json() for r in self.rows], "eu": {str(g): asdict(e) for g, e in self.eu.items()},
                "steps": {"ms": self.steps.ms,
                          "predicted_round_ms": {str(g): v for g, v in self.steps.predicted_round_ms.items()}},
                "config": self.config}

    @classmethod
    def from_json(cls, d: dict) -> "SpeculativeResult":
        """The inverse of :meth:`to_json`."""
        steps = StepCosts(d["steps"]["ms"], {int(g): v for g, v in d["steps"]["predicted_round_ms"].items()})
        return cls([VariantRow.from_json(r) for r in d["rows"]], {int(g): EUShare(**e) for g, e in d["eu"].items()},
                   steps, d.get("config", {}))


def variants(gammas: Sequence[int], confidence: Sequence[float], assisted: bool) -> list[Variant]:
    """The compared decoders in table order (module docstring)."""
    out = [Variant("hf"), Variant("plain"), Variant("plain", eu=True)]
    for g in gammas:
        out += [Variant("spec", g), Variant("spec", g, eu=True), Variant("spec", g, single_draft=True)]
        for tau in [t for t in confidence if t and g > 1]:  # (one proposal a round cannot stop earlier)
            out += [Variant("spec", g, confidence=tau), Variant("spec", g, eu=True, confidence=tau)]
        if assisted:
            out.append(Variant("assisted", g))
    return out


def step_runners(target: nn.Module, drafts: DraftEnsemble, prompt: torch.Tensor, gammas: Sequence[int]) -> dict:
    """The pieces of a round at the context of ``prompt`` (``[1, T]``) as callables, each step undone
    with ``crop``: ``target_n`` a target forward over n tokens (1, and γ + 1: the verification),
    ``draft_n`` one batched step of all K drafts over n = 1 and 2 tokens (2: a step after a fully
    accepted round)."""
    cache = DynamicCache(config=target.config)
    keyword = hf_cache_keyword(type(target))
    draft_cache = drafts.new_cache(1)
    with torch.no_grad():
        target(input_ids=prompt, use_cache=True, **{keyword: cache})
        drafts(prompt, None, draft_cache)
    T = prompt.shape[1]

    def target_step(n):  # through lm_logits, as the decoding loop runs the target
        ids, positions, mask = prompt[:, -n:], torch.arange(T, T + n)[None], torch.ones(1, T + n, dtype=torch.long)
        return torch.no_grad()(lambda: (lm_logits(target, ids, mask, positions, cache, n), cache.crop(-n)))

    def draft_step(n):
        ids, positions = prompt[:, -n:], torch.arange(T, T + n)[None]
        return torch.no_grad()(  # as DraftEstimator.generate runs the steps
            lambda: (drafts(ids, None, draft_cache, position_ids=positions, logits_to_keep=n), draft_cache.crop(-n)))

    fns = {"target_1": target_step(1), "draft_1": draft_step(1), "draft_2": draft_step(2)}
    fns.update({f"target_{g + 1}": target_step(g + 1) for g in gammas})
    return fns


@dataclass
class _Decoders:
    """What the variants run: the estimators (all K drafts, draft k alone) and the assistant model."""

    target: nn.Module
    est: DraftEstimator
    one: DraftEstimator
    assistant: Optional[nn.Module]
    proposal: Any
    new_tokens: int

    def generate(self, v: Variant, prompt: torch.Tensor):
        if v.kind == "hf":
            return self.target.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                        max_new_tokens=self.new_tokens, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)
        if v.kind == "assisted":
            return _assisted(self.target, self.assistant, prompt, v.gamma, self.new_tokens)
        kwargs = dict(max_new_tokens=self.new_tokens, with_uncertainty=v.eu)
        if v.kind == "spec":
            kwargs["speculative_tokens"] = v.gamma
        if v.confidence:
            kwargs["confidence_threshold"] = v.confidence
        if v.single_draft:
            return self.one.generate(prompt, **kwargs)
        if v.kind == "spec":
            kwargs["proposal"] = self.proposal
        return self.est.generate(prompt, **kwargs)


def _rounds(outputs: list, seconds: float, total: int) -> Optional[Rounds]:
    stats = [o.stats for o in outputs if hasattr(o, "stats")]
    if not stats:
        return None
    rounds, proposed = sum(st.rounds for st in stats), sum(sum(st.proposed) for st in stats)
    return Rounds(acceptance=sum(sum(st.accepted) for st in stats) / proposed if proposed else None,
                  tokens_per_round=total / rounds, rounds=rounds,
                  draft_forwards=sum(st.draft_forwards for st in stats), round_ms=1e3 * seconds / rounds)


def measure(target: nn.Module, drafts: DraftEnsemble, prompts: Sequence[torch.Tensor], *,
            gammas: Sequence[int] = GAMMAS, new_tokens: int = 32, repeats: int = 3, proposal="mixture",
            confidence: Sequence[float] = (CONFIDENCE,), assisted: bool = True,
            progress: bool = True) -> SpeculativeResult:
    """Time every :func:`variants` decoder on ``prompts`` (each ``[1, T]``) in interleaved rounds,
    with the :func:`step_runners` pieces at the first prompt's context in the same rounds.

    Returns the rows (speculative ones with their draft cost and :func:`spec7_verdict` against the
    faster of ``hf`` and ``plain``), EU's share of a round per γ (0 = plain decoding; from the medians
    with and without EU, and from the uncertainty calls timed in situ, :func:`eu_calls_s`) and the
    step costs.
    """
    k = 0 if proposal == "mixture" else proposal
    est = DraftEstimator(target, drafts)
    decoders = _Decoders(target, est, DraftEstimator(target, single_draft(drafts, k)),
                         draft_as_hf(drafts, k) if assisted else None, proposal, new_tokens)
    outputs: dict[Variant, list] = {}

    def over_prompts(v: Variant) -> Callable[[], None]:
        def call():
            outputs[v] = [decoders.generate(v, p) for p in prompts]
        return call

    compared = variants(gammas, confidence, assisted)
    steps = step_runners(target, drafts, prompts[0], gammas)
    seconds = interleaved_medians({**{v: over_prompts(v) for v in compared},
                                   **{name: Case(fn, calls_per_round=5) for name, fn in steps.items()}},
                                  repeats, progress=progress)
    costs = {name: 1e3 * seconds.pop(name) for name in steps}
    total = new_tokens * len(prompts)
    context = mean_decode_context(round(statistics.mean(p.shape[1] for p in prompts)), new_tokens)
    flops = lm_flops_per_token(target, context)
    draft_cost = {False: draft_ensemble_flops_per_token(drafts, context) / flops,
                  True: draft_ensemble_flops_per_token(decoders.one.drafts, context) / flops}
    hf = Variant("hf")
    reference = [r[:, p.shape[1]:] for r, p in zip(outputs[hf], prompts)]
    rows = []
    for v, s in seconds.items():
        sequences = [o if isinstance(o, torch.Tensor) else o.sequences for o in outputs[v]]
        rows.append(VariantRow(
            v, total / s, s, seconds[hf] / s,
            all(torch.equal(q[:, p.shape[1]:], r) for q, p, r in zip(sequences, prompts, reference)),
            _rounds(outputs[v], s, total), draft_cost[v.single_draft] if v.kind == "spec" else None))
    plain = plain_tokens_per_s(rows)
    for row in rows:
        if row.draft_flops_vs_target is not None:
            row.spec7 = spec7_verdict(row, plain)
    generate_kwargs = dict(max_new_tokens=new_tokens, proposal=proposal)
    eu = {g: _eu_share(est, seconds, outputs, g, prompts, dict(generate_kwargs, speculative_tokens=g))
          for g in (0, *gammas)}
    return SpeculativeResult(rows, eu, StepCosts(costs, {g: g * costs["draft_1"] + costs[f"target_{g + 1}"]
                                                         for g in gammas}),
                             {"new_tokens": new_tokens, "prompts": len(prompts),
                              "prompt_tokens": [p.shape[1] for p in prompts], "repeats": repeats,
                              "gammas": list(gammas), "proposal": proposal, "num_drafts": drafts.num_drafts,
                              "shared_layers": drafts.shared_layers, "draft_layers": drafts.num_layers,
                              "target_layers": target.config.num_hidden_layers, "vocab": drafts.vocab_size})


def _assisted(target: nn.Module, assistant: nn.Module, prompt: torch.Tensor, gamma: int, new_tokens: int):
    config = assistant.generation_config
    config.num_assistant_tokens, config.num_assistant_tokens_schedule = gamma, "constant"
    config.assistant_confidence_threshold = 0.0  # always γ candidates, as epikern proposes
    return target.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), assistant_model=assistant,
                           max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


def _eu_share(est: DraftEstimator, seconds: dict, outputs: dict, gamma: int, prompts: Sequence[torch.Tensor],
              generate_kwargs: dict) -> EUShare:
    kind = "plain" if gamma == 0 else "spec"
    on, off = Variant(kind, gamma, eu=True), Variant(kind, gamma)
    rounds = sum(o.stats.rounds for o in outputs[on])
    calls = eu_calls_s(est, prompts, generate_kwargs)
    call_s, round_s = statistics.median(calls), seconds[on] / rounds
    return EUShare(share_from_medians=(seconds[on] - seconds[off]) / seconds[on], share_of_call=call_s / round_s,
                   round_ms=1e3 * round_s, eu_call_ms=1e3 * call_s, eu_calls=len(calls))


def eu_calls_s(est: DraftEstimator, prompts: Sequence[torch.Tensor], generate_kwargs: dict) -> list[float]:
    """Seconds of every uncertainty call inside ``est.generate(p, **generate_kwargs)`` over ``prompts``.

    Timed in situ (:func:`~epikern.eval.timing.timed_call`), between the rounds' forwards: there the
    call finds its code and data evicted by the target's forward and costs ~3× what a loop of calls
    on one input measures on a CPU.
    """
    times, make = [], est.scorer

    def timed(device):
        scorer = make(device)

        def call(*args):
            u, seconds = timed_call(lambda: scorer(*args), device)
            times.append(seconds)
            return u
        return call

    est.scorer = timed
    try:
        for p in prompts:
            est.generate(p, **generate_kwargs)
    finally:
        del est.scorer  # back to the class's method
    return times
