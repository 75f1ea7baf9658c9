"""Speculative decoding with EU (SPEC §4b, §7): tokens/s against plain target decoding, in one run.

    epikern bench speculative [--target tiny|smollm2|DIR|FILE.gguf] [--drafts DIR] [--gammas 1 2 4 8]
    python benchmarks/bench_speculative.py ...   (the same)

Greedy decoding, batch 1, every variant generates exactly ``--new-tokens`` tokens per prompt (no
eos), timed round-robin over the variants (so that load from other processes falls on all alike);
tokens/s is the median over ``--repeats`` of (prompts × new tokens) ÷ wall time:

* ``hf``: the target's own ``generate(do_sample=False)`` — the anchor;
* ``plain``: :meth:`~epikern.DraftEstimator.generate` with γ = 0 and no EU (the target alone through
  epikern's decoding loop), and ``plain+EU``: γ = 0 with EU (today's plain decoding: the drafts
  shadow the target and cost time);
* per γ: ``spec`` (speculative, EU off), ``spec+EU`` (EU on every emitted token), ``spec K=1``
  (draft 0 alone as a one-draft ensemble, EU off) and ``assisted`` (transformers'
  ``generate(assistant_model=draft 0)`` with γ constant candidate tokens — the one-draft anchor).

Also reported per γ: acceptance (accepted ÷ proposed), tokens per target forward, the share of a
round spent on EU (``(t_EU − t_noEU) / t_EU`` from the medians, and from a direct timing of one
:func:`epikern.draft_uncertainty` call at the round's shape), the cost of one draft step relative to
one target token, and whether every variant produced the target's greedy tokens.

Drafts: ``--drafts DIR`` (a :meth:`DraftEnsemble.save_pretrained` directory); without it the
drafts are built from the target itself by :func:`early_exit_drafts` (no training needed): each
draft is the target's embedding, its first S layers (the shared trunk), a few of its later layers
(the branch, a different window per draft), its final norm and its LM head — fewer layers than the
target, hence cheaper per token, with whatever acceptance that gives (measured, not assumed).
``--target tiny`` (the default) is a random tiny Llama built here; pass trained checkpoints with
``--target DIR --drafts DIR``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

import epikern as ek
from ..models import DraftEnsemble, DraftEstimator
from ..models.layers import LINEARS, NORMS
from ..models.loading import load_causal_lm
from .kernel_bench import _machine

#: GSM8K-style questions for a chat target (written here; nothing is downloaded).
PROMPTS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her friends "
    "in May. How many clips did Natalia sell altogether in April and May?",
    "A bakery makes 120 muffins a day. It sells 3/4 of them in the morning and half of the rest in the "
    "afternoon. How many muffins are left at the end of the day?",
)
GAMMAS = (1, 2, 4, 8)


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
                name = stacked.param_name(hf_name)
                decoder.layers[l].get_submodule(hf_name).weight.copy_(getattr(stacked, f"{name}_weight")[g])
                bias = getattr(stacked, f"{name}_bias")
                if bias is not None:
                    decoder.layers[l].get_submodule(hf_name).bias.copy_(bias[g])
            for hf_name in NORMS:
                decoder.layers[l].get_submodule(hf_name).weight.copy_(getattr(stacked, stacked.param_name(hf_name))[g])
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


def _round_robin_s(fns: dict, repeats: int, progress: bool) -> dict:
    """Median seconds per call of each function, timed round-robin after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in tqdm(range(repeats), desc="repeats", disable=not progress):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(target: nn.Module, drafts: DraftEnsemble, prompts: Sequence[torch.Tensor], *,
            gammas: Sequence[int] = GAMMAS, new_tokens: int = 32, repeats: int = 3, proposal="mixture",
            assisted: bool = True, progress: bool = True) -> dict:
    """Time plain, speculative (EU off/on) and assisted greedy decoding of ``prompts`` (each ``[1, T]``).

    Returns a dict with ``rows`` (one per variant: ``variant``, ``gamma``, ``tokens_per_s``,
    ``speedup`` over ``hf``, ``same_tokens`` as ``hf``, and for epikern variants ``acceptance``,
    ``tokens_per_round``, ``draft_forwards``) and ``eu`` (per γ: ``share_from_medians``,
    ``share_direct``, ``round_ms``, ``eu_call_ms``), plus ``draft_step_cost`` (one draft step ÷ one
    target token, from the γ = 0 timings).
    """
    est = DraftEstimator(target, drafts)
    one = DraftEstimator(target, single_draft(drafts, 0 if proposal == "mixture" else proposal))
    assistant = draft_as_hf(drafts, 0 if proposal == "mixture" else proposal) if assisted else None
    no_eos = {"eos_token_id": None, "pad_token_id": 0}
    results: dict[str, list] = {}

    def run_all(fn: Callable[[torch.Tensor], object], name: str) -> Callable[[], None]:
        def call():
            results[name] = [fn(p) for p in prompts]
        return call

    variants = {"hf": run_all(lambda p: target.generate(input_ids=p, attention_mask=torch.ones_like(p),
                                                        max_new_tokens=new_tokens, do_sample=False, **no_eos), "hf"),
                "plain": run_all(lambda p: est.generate(p, max_new_tokens=new_tokens, with_uncertainty=False), "plain"),
                "plain+EU": run_all(lambda p: est.generate(p, max_new_tokens=new_tokens), "plain+EU")}
    for g in gammas:
        spec = dict(max_new_tokens=new_tokens, speculative_tokens=g, proposal=proposal)
        variants[f"spec γ={g}"] = run_all(lambda p, s=spec: est.generate(p, with_uncertainty=False, **s), f"spec γ={g}")
        variants[f"spec+EU γ={g}"] = run_all(lambda p, s=spec: est.generate(p, **s), f"spec+EU γ={g}")
        one_spec = dict(max_new_tokens=new_tokens, speculative_tokens=g)
        variants[f"spec K=1 γ={g}"] = run_all(lambda p, s=one_spec: one.generate(p, with_uncertainty=False, **s),
                                              f"spec K=1 γ={g}")
        if assistant is not None:
            variants[f"assisted γ={g}"] = run_all(lambda p, g=g: _assisted(target, assistant, p, g, new_tokens),
                                                  f"assisted γ={g}")
    seconds = _round_robin_s(variants, repeats, progress)
    total = new_tokens * len(prompts)
    hf_tokens = [r[:, p.shape[1]:] for r, p in zip(results["hf"], prompts)]
    rows = []
    for name, s in seconds.items():
        out = results[name]
        seqs = [o if isinstance(o, torch.Tensor) else o.sequences for o in out]
        row = {"variant": name.split(" γ=")[0], "gamma": int(name.split("γ=")[1]) if "γ=" in name else 0,
               "tokens_per_s": total / s, "seconds": s, "speedup": seconds["hf"] / s,
               "same_tokens": all(torch.equal(q[:, p.shape[1]:], h) for q, p, h in zip(seqs, prompts, hf_tokens))}
        stats = [o.stats for o in out if hasattr(o, "stats")]
        if stats:
            proposed = sum(sum(st.proposed) for st in stats)
            row.update(acceptance=sum(sum(st.accepted) for st in stats) / proposed if proposed else None,
                       tokens_per_round=total / sum(st.rounds for st in stats),
                       rounds=sum(st.rounds for st in stats), draft_forwards=sum(st.draft_forwards for st in stats))
        rows.append(row)
    eu = {g: _eu_share(est, seconds, results, g, prompts) for g in (0, *gammas)}
    # plain+EU − plain = one draft step + one EU call per token: the drafts' cost per target token
    step = (seconds["plain+EU"] - seconds["plain"]) / total - eu[0]["eu_call_ms"] / 1e3
    return {"rows": rows, "eu": eu, "draft_step_cost": step / (seconds["plain"] / total),
            "config": {"new_tokens": new_tokens, "prompts": len(prompts), "prompt_tokens": [p.shape[1] for p in prompts],
                       "repeats": repeats, "gammas": list(gammas), "proposal": proposal,
                       "num_drafts": drafts.num_drafts, "shared_layers": drafts.shared_layers,
                       "draft_layers": drafts.num_layers, "target_layers": target.config.num_hidden_layers,
                       "vocab": drafts.vocab_size}}


def _assisted(target, assistant, prompt, gamma, new_tokens):
    config = assistant.generation_config
    config.num_assistant_tokens, config.num_assistant_tokens_schedule = gamma, "constant"
    config.assistant_confidence_threshold = 0.0  # always propose γ tokens, as epikern does
    return target.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), assistant_model=assistant,
                           max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


def _eu_share(est: DraftEstimator, seconds: dict, results: dict, gamma: int, prompts) -> dict:
    """EU's share of a round: from the medians with and without EU, and from one timed EU call at the
    round's mean shape (drafts [K, 1, tokens per round, V] against the target)."""
    on, off = ("plain+EU", "plain") if gamma == 0 else (f"spec+EU γ={gamma}", f"spec γ={gamma}")
    stats = [o.stats for o in results[on]]
    rounds = sum(st.rounds for st in stats)
    per_round = max(1, round(sum(len(st.accepted) + sum(st.accepted) for st in stats) / rounds))
    K, V = est.drafts.num_drafts, est.drafts.vocab_size
    gen = torch.Generator().manual_seed(0)
    draft_logits = 4 * torch.randn(K, 1, per_round, V, generator=gen)
    target_logits = 4 * torch.randn(1, per_round, V, generator=gen)
    call = lambda: ek.draft_uncertainty(draft_logits, target_logits, backend=est.backend)  # noqa: E731
    call()
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        call()
    eu_call = (time.perf_counter() - t0) / reps
    round_s = seconds[on] / rounds
    return {"share_from_medians": (seconds[on] - seconds[off]) / seconds[on], "share_direct": eu_call / round_s,
            "round_ms": 1e3 * round_s, "eu_call_ms": 1e3 * eu_call, "tokens_per_round": per_round}


# ------------------------------------------------------------------------------------------------
# report


def format_table(result: dict) -> str:
    """Markdown tables: one row per variant, then EU's share of a round per γ."""
    lines = ["| variant | γ | tokens/s | vs hf | acceptance | tokens/round | draft steps | same tokens as hf |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        acc = "" if r.get("acceptance") is None else f"{r['acceptance']:.2f}"
        tpr = "" if "tokens_per_round" not in r else f"{r['tokens_per_round']:.2f}"
        steps = "" if "draft_forwards" not in r else str(r["draft_forwards"])
        lines.append(f"| {r['variant']} | {r['gamma'] or '–'} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}× | {acc} | "
                     f"{tpr} | {steps} | {'yes' if r['same_tokens'] else '**no**'} |")
    lines += ["", "| γ | EU share of a round (medians) | EU share (one timed call) | round ms | EU call ms |",
              "|---|---|---|---|---|"]
    for g, e in result["eu"].items():
        lines.append(f"| {g} | {100 * e['share_from_medians']:.1f} % | {100 * e['share_direct']:.1f} % | "
                     f"{e['round_ms']:.1f} | {e['eu_call_ms']:.2f} |")
    return "\n".join(lines)


def _prompts(target_spec: str, tokenizer, vocab: int, count: int, length: int) -> list[torch.Tensor]:
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        out = []
        for text in PROMPTS[:count]:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            out.append(ids)
        return out
    if tokenizer is not None:
        return [tokenizer(text, return_tensors="pt")["input_ids"] for text in PROMPTS[:count]]
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (1, length), generator=gen) for _ in range(count)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="epikern bench speculative", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="tiny", help="tiny (random, built here), smollm2, an HF directory or a .gguf")
    parser.add_argument("--drafts", type=Path, help="a DraftEnsemble directory (default: early-exit drafts of the target)")
    parser.add_argument("--num-drafts", type=int, default=4, help="K of the early-exit drafts")
    parser.add_argument("--shared-layers", type=int, default=None, help="S of the early-exit drafts (default L/4)")
    parser.add_argument("--branch-layers", type=int, default=None, help="b of the early-exit drafts (default L/8, ≥ 1)")
    parser.add_argument("--gammas", type=int, nargs="+", default=list(GAMMAS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=2, help="prompts (batch 1 each)")
    parser.add_argument("--prompt-length", type=int, default=64, help="random prompt length for a target without tokenizer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--proposal", default="mixture", help="'mixture' or a draft index")
    parser.add_argument("--no-assisted", action="store_true", help="skip transformers' assisted generation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steady on a shared machine)")
    parser.add_argument("--json", type=Path, help="also write machine info, config and rows as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    proposal = args.proposal if args.proposal == "mixture" else int(args.proposal)
    if args.target == "tiny":
        target, tokenizer = tiny_target(), None
    else:
        target, tokenizer = load_causal_lm(args.target)
    L = target.config.num_hidden_layers
    if args.drafts is not None:
        drafts = DraftEnsemble.from_pretrained(str(args.drafts))
        how = f"DraftEnsemble from {args.drafts}"
    else:
        S = L // 4 if args.shared_layers is None else args.shared_layers
        b = max(1, L // 8) if args.branch_layers is None else args.branch_layers
        drafts = early_exit_drafts(target, args.num_drafts, S, b)
        how = f"early-exit drafts of the target: trunk = its first {S} layers, each branch {b} of its later layers"
    prompts = _prompts(args.target, tokenizer, target.config.vocab_size, args.prompts, args.prompt_length)
    machine = _machine()
    result = measure(target, drafts, prompts, gammas=args.gammas, new_tokens=args.new_tokens, repeats=args.repeats,
                     proposal=proposal, assisted=not args.no_assisted)
    machine["loadavg_end"] = _machine()["loadavg_start"]
    c = result["config"]
    print(f"\nSpeculative decoding with EU, target {args.target} ({L} layers, V={c['vocab']}), {how} "
          f"(K={c['num_drafts']}, S={c['shared_layers']}, {c['draft_layers']} layers each), greedy, batch 1, "
          f"{c['prompts']} prompt(s) of {c['prompt_tokens']} tokens × {c['new_tokens']} new tokens, proposal "
          f"{c['proposal']}, median of {c['repeats']} (round-robin). {machine['cpu']}, {machine['cores']} cores, "
          f"torch {machine['torch']} ({args.threads} thread(s)), transformers {transformers.__version__}, load average "
          f"{machine['loadavg_start']:.2f} → {machine['loadavg_end']:.2f}. One draft step costs "
          f"{result['draft_step_cost']:.2f}× one target token.\n")
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "versions": {"transformers": transformers.__version__,
                                         "python": platform.python_version()}, "target": args.target,
                                         "drafts": how, **result}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
