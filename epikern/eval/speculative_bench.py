"""Speculative decoding with EU (SPEC §4b, §7): tokens/s against plain target decoding, in one run.

    epikern bench speculative [--target tiny|smollm2|DIR|FILE.gguf] [--drafts DIR|self] [--gammas 1 2 4 8]
    python benchmarks/bench_speculative.py ...   (the same)

Greedy decoding, batch 1, every variant generates exactly ``--new-tokens`` tokens per prompt (no
eos), timed round-robin over the variants (so that load from other processes falls on all alike);
tokens/s is the median over ``--repeats`` of (prompts × new tokens) ÷ wall time:

* ``hf``: the target's own ``generate(do_sample=False)`` — the anchor;
* ``plain``: :meth:`~epikern.DraftEstimator.generate` with γ = 0 and no EU (the target alone through
  epikern's decoding loop), and ``plain+EU``: γ = 0 with EU (plain decoding where the drafts shadow
  the target only to score it);
* per γ: ``spec`` (speculative, EU off), ``spec+EU`` (EU on every emitted token), ``spec K=1``
  (draft 0 alone as a one-draft ensemble, EU off) and ``assisted`` (transformers'
  ``generate(assistant_model=draft 0)`` with γ candidate tokens a round — the one-draft anchor);
* per γ ≥ 2, the adaptive rounds ``spec τ`` and ``spec+EU τ``: γ at most, a round ends after a
  proposal with q(y) < τ, for each τ of ``--confidence`` (default :data:`CONFIDENCE`; 0: none).

Also reported: acceptance (accepted ÷ proposed), tokens per target forward, EU's share of a round
(from the medians with and without EU, and from one timed :func:`epikern.draft_uncertainty` call at
the round's shape), the cost of each step of a round (:func:`step_runners`), and whether every variant
produced the target's greedy tokens.

Drafts: ``--drafts DIR`` (a :meth:`DraftEnsemble.save_pretrained` directory, e.g. trained DDD
drafts); ``--drafts self`` (the target itself as one draft: every proposal is right and a draft step
costs a target step — the acceptance ceiling); by default :func:`early_exit_drafts`, built from the
target without training: the target's embedding, its first S layers (the shared trunk), a few of
its later layers (the branch, a different window per draft), its final norm and LM head — fewer
layers than the target, with whatever acceptance that gives (measured, not assumed). ``--target
tiny`` (the default) is a random tiny Llama built here; for a target with a tokenizer the prompts
are GSM8K test questions (chat models) or synthetic problems (the character-level tiny models), in
the project's prompt format.
"""

from __future__ import annotations

from ..extras import require

require("eval", __name__)

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

import epikern as ek
from ..models import DraftEnsemble, DraftEstimator
from ..models.hf import hf_cache_keyword, lm_logits
from ..models.layers import LINEARS, NORMS
from ..models.loading import load_causal_lm
from .cost import draft_ensemble_flops_per_token, lm_flops_per_token, mean_decode_context
from .report import machine_info, versions

#: GSM8K-style questions for a chat target (written here; nothing is downloaded).
PROMPTS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her friends "
    "in May. How many clips did Natalia sell altogether in April and May?",
    "A bakery makes 120 muffins a day. It sells 3/4 of them in the morning and half of the rest in the "
    "afternoon. How many muffins are left at the end of the day?",
)
GAMMAS = (1, 2, 4, 8)
#: τ of the adaptive variants: of 0.3 / 0.5 / 0.7 / 0.9, the best for the tiny DDD drafts at γ = 4 and
#: within 4 % of the best (0.9) at γ = 8 (benchmarks/RESULTS.md); transformers' assisted generation uses 0.4.
CONFIDENCE = 0.7


# ------------------------------------------------------------------------------------------------
# models


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


# ------------------------------------------------------------------------------------------------
# measurement


def _round_robin_s(fns: dict, repeats: int, progress: bool, inner: Optional[dict] = None) -> dict:
    """Median seconds per call of each function, timed round-robin after one warm-up call each:
    every round runs each function ``inner.get(name, 1)`` times, so that load from other processes
    falls on all of them alike."""
    inner = inner or {}
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in tqdm(range(repeats), desc="repeats", disable=not progress):
        for name, fn in fns.items():
            for _ in range(inner.get(name, 1)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


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


def measure(target: nn.Module, drafts: DraftEnsemble, prompts: Sequence[torch.Tensor], *,
            gammas: Sequence[int] = GAMMAS, new_tokens: int = 32, repeats: int = 3, proposal="mixture",
            confidence: Sequence[float] = (CONFIDENCE,), assisted: bool = True, progress: bool = True) -> dict:
    """Time plain, speculative (EU off/on) and assisted greedy decoding of ``prompts`` (each ``[1, T]``).

    Each τ > 0 of ``confidence`` adds, for γ ≥ 2, the adaptive ``spec τ`` and ``spec+EU τ`` (a round stops
    after a proposal with q(y) < τ). Returns a dict with

    * ``rows``: one per variant (``variant``, ``gamma``, ``tokens_per_s``, ``speedup`` over ``hf``,
      ``same_tokens`` as ``hf``; for epikern variants ``acceptance``, ``tokens_per_round``,
      ``rounds``, ``draft_forwards``, ``round_ms``; for the speculative ones also
      ``draft_flops_vs_target`` and ``spec7``, :func:`spec7_verdict` against the faster of ``hf``
      and ``plain``);
    * ``eu``: per γ (0 = plain decoding), EU's share of a round from the medians
      (``(t_EU − t_noEU) / t_EU``; at γ = 0 this includes the drafts, which run only for EU there)
      and from the median uncertainty call timed inside the decoding loop (:func:`eu_calls_s`);
    * ``steps``: the ms of each :func:`step_runners` piece at the first prompt's context (timed in the
      same rounds as the decoders), and per γ the round time they predict, ``γ·draft_1 + target_{γ+1}``.
    """
    est = DraftEstimator(target, drafts)
    k = 0 if proposal == "mixture" else proposal
    one = DraftEstimator(target, single_draft(drafts, k))
    assistant = draft_as_hf(drafts, k) if assisted else None
    results: dict[str, list] = {}

    def over_prompts(name: str, fn: Callable[[torch.Tensor], object]) -> tuple[str, Callable[[], None]]:
        def call():
            results[name] = [fn(p) for p in prompts]
        return name, call

    def hf(p):
        return target.generate(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=new_tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=0)

    variants = dict([over_prompts("hf", hf),
                     over_prompts("plain", lambda p: est.generate(p, max_new_tokens=new_tokens, with_uncertainty=False)),
                     over_prompts("plain+EU", lambda p: est.generate(p, max_new_tokens=new_tokens))])
    for g in gammas:
        kw = dict(max_new_tokens=new_tokens, speculative_tokens=g)
        variants.update([
            over_prompts(f"spec γ={g}", lambda p, kw=kw: est.generate(p, proposal=proposal, with_uncertainty=False, **kw)),
            over_prompts(f"spec+EU γ={g}", lambda p, kw=kw: est.generate(p, proposal=proposal, **kw)),
            over_prompts(f"spec K=1 γ={g}", lambda p, kw=kw: one.generate(p, with_uncertainty=False, **kw))])
        for tau in [t for t in confidence if t and g > 1]:  # (one proposal a round cannot stop earlier)
            kw_tau = dict(kw, proposal=proposal, confidence_threshold=tau)
            variants.update([
                over_prompts(f"spec τ={tau} γ={g}", lambda p, kw=kw_tau: est.generate(p, with_uncertainty=False, **kw)),
                over_prompts(f"spec+EU τ={tau} γ={g}", lambda p, kw=kw_tau: est.generate(p, **kw))])
        if assistant is not None:
            variants.update([over_prompts(f"assisted γ={g}", lambda p, g=g: _assisted(target, assistant, p, g, new_tokens))])
    steps = step_runners(target, drafts, prompts[0], gammas)  # timed in the same rounds as the decoders
    seconds = _round_robin_s({**variants, **steps}, repeats, progress, inner={name: 5 for name in steps})
    costs = {name: 1e3 * seconds.pop(name) for name in steps}
    total = new_tokens * len(prompts)
    context = mean_decode_context(round(statistics.mean(p.shape[1] for p in prompts)), new_tokens)
    flops = lm_flops_per_token(target, context)
    ratio = {"K": draft_ensemble_flops_per_token(drafts, context) / flops,
             "1": draft_ensemble_flops_per_token(one.drafts, context) / flops}
    draft_cost = {"spec": ratio["K"], "spec+EU": ratio["K"], "spec K=1": ratio["1"]}
    reference = [r[:, p.shape[1]:] for r, p in zip(results["hf"], prompts)]
    rows = []
    for name, s in seconds.items():
        sequences = [o if isinstance(o, torch.Tensor) else o.sequences for o in results[name]]
        row = {"variant": name.split(" γ=")[0], "gamma": int(name.split("γ=")[1]) if "γ=" in name else 0,
               "tokens_per_s": total / s, "seconds": s, "speedup": seconds["hf"] / s,
               "same_tokens": all(torch.equal(q[:, p.shape[1]:], r) for q, p, r in zip(sequences, prompts, reference))}
        stats = [o.stats for o in results[name] if hasattr(o, "stats")]
        if stats:
            rounds, proposed = sum(st.rounds for st in stats), sum(sum(st.proposed) for st in stats)
            row.update(acceptance=sum(sum(st.accepted) for st in stats) / proposed if proposed else None,
                       tokens_per_round=total / rounds, rounds=rounds,
                       draft_forwards=sum(st.draft_forwards for st in stats), round_ms=1e3 * s / rounds)
        cost = draft_cost.get(row["variant"].split(" τ=")[0])  # the drafts that ran, analytic FLOPs a token
        if cost is not None:
            row["draft_flops_vs_target"] = cost
        rows.append(row)
    plain = plain_tokens_per_s(rows)
    for row in rows:
        if "draft_flops_vs_target" in row:
            row["spec7"] = spec7_verdict(row, plain)
    predicted = {g: g * costs["draft_1"] + costs[f"target_{g + 1}"] for g in gammas}
    eu = {g: _eu_share(est, seconds, results, g, prompts, dict(max_new_tokens=new_tokens, speculative_tokens=g,
                                                               proposal=proposal)) for g in (0, *gammas)}
    return {"rows": rows, "eu": eu,
            "steps": {"ms": costs, "predicted_round_ms": predicted},
            "config": {"new_tokens": new_tokens, "prompts": len(prompts), "prompt_tokens": [p.shape[1] for p in prompts],
                       "repeats": repeats, "gammas": list(gammas), "proposal": proposal,
                       "num_drafts": drafts.num_drafts, "shared_layers": drafts.shared_layers,
                       "draft_layers": drafts.num_layers, "target_layers": target.config.num_hidden_layers,
                       "vocab": drafts.vocab_size}}


def spec7_verdict(row: dict, plain_tokens_per_s: float, accepted_per_round: int = 2) -> str:
    """SPEC §7's speed target for one speculative row: tokens/s ≥ plain target decoding wherever the
    drafts are cheaper than the target and accept ≥ 2 tokens per round.

    "Accept ≥ 2 tokens per round" is read literally: at least ``accepted_per_round`` of the drafts'
    proposals accepted a round on average (``tokens_per_round − 1``: the round's last token is the
    target's own); ``accepted_per_round=1`` is the loose reading, ≥ 2 tokens a target forward.
    "Cheaper" is the project's cost metric, analytic FLOPs a token (``row["draft_flops_vs_target"]``:
    all drafts that ran ÷ the target, at the mean decode context): a step's wall time also measures
    the implementation (epikern's stacked step dispatches less than an HF module), so the target
    itself as its draft runs faster per step than the target yet costs exactly as much. "Plain target
    decoding" is the faster of ``hf`` and ``plain`` in the same run (``plain_tokens_per_s``).

    Returns ``"met"``, ``"not met"``, or why the row is outside the condition.
    """
    if row["draft_flops_vs_target"] >= 1:
        return "outside: drafts not cheaper"
    if row["tokens_per_round"] - 1 < accepted_per_round:
        return f"outside: < {accepted_per_round} accepted/round"
    return "met" if row["tokens_per_s"] >= plain_tokens_per_s else "not met"


def plain_tokens_per_s(rows: Sequence[dict]) -> float:
    """Plain target decoding's speed in a run: the faster of ``hf`` and ``plain``."""
    return max(r["tokens_per_s"] for r in rows if r["variant"] in ("hf", "plain"))


def _assisted(target: nn.Module, assistant: nn.Module, prompt: torch.Tensor, gamma: int, new_tokens: int):
    config = assistant.generation_config
    config.num_assistant_tokens, config.num_assistant_tokens_schedule = gamma, "constant"
    config.assistant_confidence_threshold = 0.0  # always γ candidates, as epikern proposes
    return target.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), assistant_model=assistant,
                           max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


def _eu_share(est: DraftEstimator, seconds: dict, results: dict, gamma: int, prompts: Sequence[torch.Tensor],
              generate_kwargs: dict) -> dict:
    on, off = ("plain+EU", "plain") if gamma == 0 else (f"spec+EU γ={gamma}", f"spec γ={gamma}")
    stats = [o.stats for o in results[on]]
    rounds = sum(st.rounds for st in stats)
    calls = eu_calls_s(est, prompts, generate_kwargs)
    call_s, round_s = statistics.median(calls), seconds[on] / rounds
    return {"share_from_medians": (seconds[on] - seconds[off]) / seconds[on], "share_of_call": call_s / round_s,
            "round_ms": 1e3 * round_s, "eu_call_ms": 1e3 * call_s, "eu_calls": len(calls)}


def eu_calls_s(est: DraftEstimator, prompts: Sequence[torch.Tensor], generate_kwargs: dict) -> list[float]:
    """Seconds of every uncertainty call inside ``est.generate(p, **generate_kwargs)`` over ``prompts``.

    Timed in situ, between the rounds' forwards: there the call finds its code and data evicted by
    the target's forward and costs ~3× what a loop of calls on one input measures on a CPU.
    """
    times, make = [], est._scorer
    sync = torch.cuda.synchronize if prompts[0].is_cuda else (lambda: None)

    def timed(device):
        scorer = make(device)

        def call(*args):
            sync()
            t0 = time.perf_counter()
            u = scorer(*args)
            sync()
            times.append(time.perf_counter() - t0)
            return u
        return call

    est._scorer = timed
    try:
        for p in prompts:
            est.generate(p, **generate_kwargs)
    finally:
        del est._scorer  # back to the class's method
    return times


# ------------------------------------------------------------------------------------------------
# report


HEADER = ("| variant | γ | tokens/s | vs hf | acceptance | tokens/round | round ms | draft steps | draft FLOPs ÷ target "
          "| SPEC §7 | same tokens as hf |\n|---|---|---|---|---|---|---|---|---|---|---|")


def format_table(result: dict) -> str:
    """Markdown: one row per variant; EU's share of a round per γ; the step costs.

    ``result`` is :func:`measure`'s or the same loaded back from ``--json`` (whose γ keys are strings).
    """
    lines = [HEADER]
    for r in result["rows"]:
        acc = "–" if r.get("acceptance") is None else f"{r['acceptance']:.2f}"
        extra = ["–", "–", "–"] if "rounds" not in r else \
            [f"{r['tokens_per_round']:.2f}", f"{r['round_ms']:.2f}", str(r["draft_forwards"])]
        cost = f"{r['draft_flops_vs_target']:.2f}" if "draft_flops_vs_target" in r else "–"
        verdict = {"not met": "**not met**"}.get(r.get("spec7"), r.get("spec7", "–"))
        lines.append(f"| {r['variant']} | {r['gamma'] or '–'} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}× | {acc} | "
                     f"{' | '.join(extra)} | {cost} | {verdict} | {'yes' if r['same_tokens'] else '**no**'} |")
    plain, spec = plain_tokens_per_s(result["rows"]), [r for r in result["rows"] if "spec7" in r]
    counts = []
    for accepted in (2, 1):
        inside = [v for v in (spec7_verdict(r, plain, accepted) for r in spec) if v in ("met", "not met")]
        counts.append(f"{len(inside)} rows inside, {inside.count('met')} met, {inside.count('not met')} not met")
    lines += ["", "SPEC §7 (tokens/s ≥ plain target decoding, the faster of hf and plain, wherever the drafts cost "
              f"less than the target in FLOPs a token and accept ≥ 2 proposals a round): {counts[0]}; read as "
              f"≥ 2 tokens a target forward (the target's own token counted): {counts[1]}."]
    lines += ["", "| γ | EU share of a round (with − without EU) | one EU call in situ ÷ round | round ms (EU on) | EU call ms |",
              "|---|---|---|---|---|"]
    for g, e in result["eu"].items():
        lines.append(f"| {int(g) or '0 (plain: drafts + EU)'} | {100 * e['share_from_medians']:.1f} % | "
                     f"{100 * e['share_of_call']:.1f} % | {e['round_ms']:.2f} | {e['eu_call_ms']:.3f} |")
    ms = result["steps"]["ms"]
    pred = {int(g): v for g, v in result["steps"]["predicted_round_ms"].items()}
    lines += ["", "Step costs at the prompt's context (ms): target 1 token " + f"{ms['target_1']:.2f}, "
              + ", ".join(f"target {g + 1} tokens {ms[f'target_{g + 1}']:.2f}" for g in pred)
              + f"; all K drafts 1 token {ms['draft_1']:.2f} ({ms['draft_1'] / ms['target_1']:.2f}× the target), "
              f"2 tokens {ms['draft_2']:.2f}. Predicted speculative round γ·draft + verify (ms): "
              + ", ".join(f"γ={g}: {v:.2f}" for g, v in pred.items()) + "."]
    return "\n".join(lines)


def _prompts(tokenizer, vocab: int, count: int, length: int, dataset: str) -> list[torch.Tensor]:
    """Batch-1 prompts: GSM8K test questions or synthetic problems through the project's prompt
    format (:func:`epikern.data.encode_prompt`), or random ids for a target without tokenizer."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(1)
        return [torch.randint(0, vocab, (1, length), generator=gen) for _ in range(count)]
    from ..data import encode_prompt, generate_problems, load_gsm8k

    problems = load_gsm8k("test", limit=count) if dataset == "gsm8k" else generate_problems(count, seed=12345)
    return [torch.tensor([encode_prompt(tokenizer, p.question)]) for p in problems]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="epikern bench speculative", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="tiny", help="tiny (random, built here), smollm2, an HF directory or a .gguf")
    parser.add_argument("--drafts", default=None,
                        help="a DraftEnsemble directory, or 'self' (the target itself as one draft: every proposal "
                             "right, as costly as the target); default: early-exit drafts of the target")
    parser.add_argument("--num-drafts", type=int, default=4, help="K of the early-exit drafts")
    parser.add_argument("--shared-layers", type=int, default=None, help="S of the early-exit drafts (default L/4)")
    parser.add_argument("--branch-layers", type=int, default=None, help="b of the early-exit drafts (default L/8, ≥ 1)")
    parser.add_argument("--gammas", type=int, nargs="+", default=list(GAMMAS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=2, help="prompts (batch 1 each)")
    parser.add_argument("--dataset", choices=("gsm8k", "synthetic"), default=None,
                        help="questions for a target with a tokenizer (default: gsm8k for a chat template, else synthetic)")
    parser.add_argument("--prompt-length", type=int, default=64, help="random prompt length for the tiny random target")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--proposal", default="mixture", help="'mixture' or a draft index")
    parser.add_argument("--confidence", type=float, nargs="+", default=[CONFIDENCE],
                        help="τ of the adaptive variants, one pair of rows each (a round stops after a proposal "
                             "with q(y) < τ); 0: none")
    parser.add_argument("--no-assisted", action="store_true", help="skip transformers' assisted generation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steady on a shared machine)")
    parser.add_argument("--json", type=Path, help="also write machine info, config and rows as JSON")
    parser.add_argument("--plot", type=Path, help="also plot the speed and tokens per round against γ (PNG)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    proposal = args.proposal if args.proposal == "mixture" else int(args.proposal)
    target, tokenizer = (tiny_target(), None) if args.target == "tiny" else load_causal_lm(args.target)
    L = target.config.num_hidden_layers
    if args.drafts == "self":
        drafts, how = DraftEnsemble.from_models([target], L), "the target itself as one draft"
    elif args.drafts is not None:
        drafts, how = DraftEnsemble.from_pretrained(args.drafts), f"DraftEnsemble {args.drafts}"
    else:
        S = L // 4 if args.shared_layers is None else args.shared_layers
        b = max(1, L // 8) if args.branch_layers is None else args.branch_layers
        drafts = early_exit_drafts(target, args.num_drafts, S, b)
        how = f"early-exit drafts of the target (its first {S} layers shared, then {b} of its later layers each)"
    chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    dataset = args.dataset or ("gsm8k" if chat else "synthetic")
    prompts = _prompts(tokenizer, target.config.vocab_size, args.prompts, args.prompt_length, dataset)
    machine = machine_info()  # the same record as epikern bench's report.json
    result = measure(target, drafts, prompts, gammas=args.gammas, new_tokens=args.new_tokens, repeats=args.repeats,
                     proposal=proposal, confidence=args.confidence, assisted=not args.no_assisted)
    machine["loadavg_end"] = os.getloadavg()[0]
    c = result["config"]
    print(f"\nSpeculative decoding with EU: target {args.target} ({L} layers, V={c['vocab']}), {how}: K={c['num_drafts']}, "
          f"S={c['shared_layers']}, {c['draft_layers']} layers each; greedy, batch 1, {c['prompts']} prompt(s) of "
          f"{c['prompt_tokens']} tokens ({dataset if tokenizer is not None else 'random ids'}) × {c['new_tokens']} new "
          f"tokens, proposal {c['proposal']}, median of {c['repeats']} (round-robin). {machine['cpu']}, "
          f"{machine['cores']} cores, torch {machine['torch']} ({args.threads} thread(s)), transformers "
          f"{transformers.__version__}, load average {machine['loadavg_start']:.2f} → {machine['loadavg_end']:.2f}.\n")
    print(format_table(result))
    if args.plot:
        from .plots import speculative_speedup

        title = f"Speculative decoding: a {L}-layer target, K = {c['num_drafts']} drafts, greedy, batch 1"
        print(f"\nplot: {speculative_speedup(args.plot, result['rows'], title=title)}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "versions": versions(), "target": args.target,
                                         "drafts": how, "dataset": dataset, **result}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
