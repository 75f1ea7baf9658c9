"""``epikern bench speculative``: speculative decoding with EU (design §4b, §7), tokens/s against plain
target decoding, in one run — the command and its Markdown output.

    epikern bench speculative [--target tiny|smollm2|DIR|FILE.gguf] [--drafts DIR|self] [--gammas 1 2 4 8]
    python benchmarks/bench_speculative.py ...   (the same)

The variants and how they are timed: :mod:`epikern.eval.speculative_measure`; the drafts built from
the target: :mod:`epikern.eval.speculative_models`; design §7's verdict:
:mod:`epikern.eval.speculative_verdict`. Also reported: acceptance (accepted ÷ proposed), tokens per
target forward, EU's share of a round (from the medians with and without EU, and from the
uncertainty calls timed inside the decoding loop), the cost of each step of a round, and whether
every variant produced the target's greedy tokens.

Drafts: ``--drafts DIR`` (a :meth:`DraftEnsemble.save_pretrained` directory, e.g. trained DDD
drafts); ``--drafts self`` (the target itself as one draft: every proposal is right and a draft step
costs a target step — the acceptance ceiling); by default
:func:`~epikern.eval.speculative_models.early_exit_drafts`, built from the target without training:
the target's embedding, its first S layers (the shared trunk), a few of its later layers (the
branch, a different window per draft), its final norm and LM head — fewer layers than the target,
with whatever acceptance that gives (measured, not assumed). ``--target tiny`` (the default) is a
random tiny Llama built here; for a target with a tokenizer the prompts are GSM8K test questions
(chat models) or synthetic problems (the character-level tiny models), in the project's prompt
format.
"""

from __future__ import annotations

from ..extras import require

require("eval", __name__)

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import transformers

from ..models import DraftEnsemble
from ..models.loading import load_causal_lm
from .machine import machine_info, versions
from .report import write_json
from .speculative_measure import CONFIDENCE, GAMMAS, SpeculativeResult, measure
from .speculative_models import early_exit_drafts, tiny_target
from .speculative_verdict import plain_tokens_per_s, spec7_verdict

__all__ = ["markdown", "main"]


HEADER = ("| variant | γ | tokens/s | vs hf | acceptance | tokens/round | round ms | draft steps | draft FLOPs ÷ target "
          "| design §7 | same tokens as hf |\n|---|---|---|---|---|---|---|---|---|---|---|")


def markdown(result: SpeculativeResult) -> str:
    """Markdown: one row per variant; the design §7 counts; EU's share of a round per γ; the step costs."""
    lines = [HEADER]
    for r in result.rows:
        rounds = r.rounds
        acc = "–" if rounds is None or rounds.acceptance is None else f"{rounds.acceptance:.2f}"
        extra = ["–", "–", "–"] if rounds is None else \
            [f"{rounds.tokens_per_round:.2f}", f"{rounds.round_ms:.2f}", str(rounds.draft_forwards)]
        cost = "–" if r.draft_flops_vs_target is None else f"{r.draft_flops_vs_target:.2f}"
        verdict = {"not met": "**not met**", None: "–"}.get(r.spec7, r.spec7)
        lines.append(f"| {r.variant.label} | {r.variant.gamma or '–'} | {r.tokens_per_s:.1f} | {r.speedup:.2f}× | "
                     f"{acc} | {' | '.join(extra)} | {cost} | {verdict} | {'yes' if r.same_tokens else '**no**'} |")
    plain, spec = plain_tokens_per_s(result.rows), [r for r in result.rows if r.spec7 is not None]
    counts = []
    for accepted in (2, 1):
        inside = [v for v in (spec7_verdict(r, plain, accepted) for r in spec) if v in ("met", "not met")]
        counts.append(f"{len(inside)} rows inside, {inside.count('met')} met, {inside.count('not met')} not met")
    lines += ["", "design §7 (tokens/s ≥ plain target decoding, the faster of hf and plain, wherever the drafts cost "
              f"less than the target in FLOPs a token and accept ≥ 2 proposals a round): {counts[0]}; read as "
              f"≥ 2 tokens a target forward (the target's own token counted): {counts[1]}."]
    lines += ["", "| γ | EU share of a round (with − without EU) | one EU call in situ ÷ round | round ms (EU on) | EU call ms |",
              "|---|---|---|---|---|"]
    for g, e in result.eu.items():
        lines.append(f"| {g or '0 (plain: drafts + EU)'} | {100 * e.share_from_medians:.1f} % | "
                     f"{100 * e.share_of_call:.1f} % | {e.round_ms:.2f} | {e.eu_call_ms:.3f} |")
    ms, pred = result.steps.ms, result.steps.predicted_round_ms
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
    c = result.config
    print(f"\nSpeculative decoding with EU: target {args.target} ({L} layers, V={c['vocab']}), {how}: K={c['num_drafts']}, "
          f"S={c['shared_layers']}, {c['draft_layers']} layers each; greedy, batch 1, {c['prompts']} prompt(s) of "
          f"{c['prompt_tokens']} tokens ({dataset if tokenizer is not None else 'random ids'}) × {c['new_tokens']} new "
          f"tokens, proposal {c['proposal']}, median of {c['repeats']} (round-robin). {machine['cpu']}, "
          f"{machine['cores']} cores, torch {machine['torch']} ({args.threads} thread(s)), transformers "
          f"{transformers.__version__}, load average {machine['loadavg_start']:.2f} → {machine['loadavg_end']:.2f}.\n")
    print(markdown(result))
    if args.plot:
        from .plots import speculative_speedup

        title = f"Speculative decoding: a {L}-layer target, K = {c['num_drafts']} drafts, greedy, batch 1"
        print(f"\nplot: {speculative_speedup(args.plot, [r.to_json() for r in result.rows], title=title)}")
    if args.json:
        write_json(args.json, {"machine": machine, "versions": versions(), "target": args.target, "drafts": how,
                               "dataset": dataset, **result.to_json()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
