"""tokens/s of transformers' ``generate``: plain greedy decoding against epikern's
``custom_generate=epikern.integrations.hf.generate`` with EU on every token (γ = 0, 2, 4).

    python benchmarks/bench_hf_generate.py [--target tiny|smollm2|DIR] [--drafts DIR] [--gammas 0 2 4]
                                           [--new-tokens 32] [--prompts 2] [--rounds 5] [--threads 1]

Greedy, batch 1, no eos (every variant emits exactly ``--new-tokens`` tokens per prompt, and every
variant's tokens are checked to be the plain call's), timed in interleaved rounds
(:func:`epikern.eval.timing.interleaved_medians`): tokens/s is (prompts × new tokens) ÷ the median
wall time of one pass over the prompts. Drafts: ``--drafts DIR``, else early-exit drafts cut from
the target as ``epikern bench speculative`` builds them (K = 4, its first L/4 layers shared, then
L/8 of its later layers each); ``tiny`` is that benchmark's random 8-layer Llama with random
64-token prompts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from epikern.data import encode_prompt, generate_problems, load_gsm8k
from epikern.eval.machine import machine_info
from epikern.eval.speculative_models import early_exit_drafts, tiny_target
from epikern.eval.timing import interleaved_medians
from epikern.integrations import hf
from epikern.models import DraftEnsemble
from epikern.models.loading import load_causal_lm


def prompts_for(model, tokenizer, count: int) -> list[torch.Tensor]:
    """Random 64-token prompts without a tokenizer; else GSM8K test questions (a chat model) or
    synthetic problems (the character-level tiny models) in the project's prompt format."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(1)
        return [torch.randint(0, model.config.vocab_size, (1, 64), generator=gen) for _ in range(count)]
    chat = bool(getattr(tokenizer, "chat_template", None))
    problems = load_gsm8k("test", limit=count) if chat else generate_problems(count, seed=12345)
    return [torch.tensor([encode_prompt(tokenizer, p.question)]) for p in problems]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="tiny", help="tiny (random, built here), smollm2 or an HF directory")
    parser.add_argument("--drafts", default=None, help="a DraftEnsemble directory (default: early-exit drafts)")
    parser.add_argument("--gammas", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, tokenizer = (tiny_target(), None) if args.target == "tiny" else load_causal_lm(args.target)
    L = model.config.num_hidden_layers
    if args.drafts is None:
        S, b = L // 4, max(1, L // 8)
        drafts, how = early_exit_drafts(model, 4, S, b), f"4 early-exit drafts (S={S}, b={b})"
    else:
        drafts = DraftEnsemble.from_pretrained(args.drafts)
        how = f"DraftEnsemble {args.drafts} (K={drafts.num_drafts}, S={drafts.shared_layers})"
    prompts = prompts_for(model, tokenizer, args.prompts)
    options = dict(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    def plain():
        return [model.generate(p, attention_mask=torch.ones_like(p), **options) for p in prompts]

    def with_stats(gamma):  # the DraftGenerateOutput of each prompt
        return [model.generate(p, attention_mask=torch.ones_like(p), **options, custom_generate=hf.generate,
                               drafts=drafts, speculative_tokens=gamma, return_dict_in_generate=True) for p in prompts]

    def with_eu(gamma):
        return lambda: [out.sequences for out in with_stats(gamma)]

    cases = {"generate": plain, **{f"custom_generate+EU γ={g}": with_eu(g) for g in args.gammas}}
    reference = plain()
    for name, fn in cases.items():
        if not all(torch.equal(a, b) for a, b in zip(fn(), reference)):
            raise AssertionError(f"{name} did not produce the plain greedy tokens")
    rounds = {f"custom_generate+EU γ={g}": [out.stats for out in with_stats(g)] for g in args.gammas if g}
    machine = machine_info()
    seconds = interleaved_medians(cases, args.rounds)
    tokens = args.new_tokens * len(prompts)
    print(f"target {args.target} ({L} layers, V={model.config.vocab_size}), {how}, batch 1, {len(prompts)} prompts "
          f"× {args.new_tokens} new tokens, {args.rounds} interleaved rounds, {args.threads} thread(s)")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, 1-minute load {machine['loadavg_start']:.1f} at "
          f"the start, {os.getloadavg()[0]:.1f} at the end")
    print("| variant | tokens/s | × generate | acceptance | tokens / target forward |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, s in seconds.items():
        stats = rounds.get(name)
        extra = "– | 1.00" if not stats else (f"{statistics.mean(st.acceptance_rate for st in stats):.2f} | "
                                               f"{statistics.mean(st.tokens_per_round for st in stats):.2f}")
        print(f"| {name} | {tokens / s:.1f} | {seconds['generate'] / s:.2f} | {extra} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
