"""Throughput of vLLM plain, speculative with the epikern drafts, and speculative + EU on SmolLM2.

    python -m epikern.integrations.vllm.bench --gammas 1 3 --num-drafts 2 --max-tokens 64

For each γ the three engines run side by side (one process each) and their ``generate`` calls are
interleaved round by round, so a shared host slows them alike; the report gives the median
tokens/s of each and the EU overhead per emitted token, ``(t_eu − t_spec) / t_spec`` of the
per-token times. "Speculative" is the same engine as "+ EU" started with ``EPIKERN_VLLM_EU=0``: the
K-branch drafts propose from their mixture and nothing is scored.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ...models import DraftEnsemble
from ...models.loading import load_causal_lm
from . import engine_args, export_drafts, uncertainty
from .runner_hooks import EU_SWITCH

PROMPTS = ["The three primary colors are", "Q: What is 12 + 7?\nA:", "Write a haiku about the sea.",
           "Explain what a prime number is, in one sentence:"]


def drafts_cut_from(model, num_drafts: int, *, layers: int = 4, shared_layers: int = 2, seed: int = 0,
                    jitter: float = 0.02) -> DraftEnsemble:
    """K drafts from an HF Llama-family LM's first ``layers`` layers (+ its final norm and head): the
    first ``shared_layers`` are the trunk, each branch a copy of the rest with Gaussian jitter
    (``DraftEnsemble.from_base``), so the drafts differ a little and agree with the target often."""
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:layers]
    small.config.num_hidden_layers = layers
    return DraftEnsemble.from_base(small, num_drafts, shared_layers, seed=seed, jitter=jitter).eval()


def run(gammas, num_drafts: int, max_tokens: int, repeats: int, workdir: Path) -> list[dict]:
    from vllm import LLM, SamplingParams

    model, tokenizer = load_causal_lm("smollm2")
    target_dir = workdir / "target"
    model.save_pretrained(target_dir)
    tokenizer.save_pretrained(target_dir)
    draft_dir = export_drafts(drafts_cut_from(model, num_drafts), workdir / "drafts")
    del model
    common = dict(model=str(target_dir), dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    rows = []
    for gamma in gammas:
        os.environ[EU_SWITCH] = "0"
        engines = {"plain": LLM(**common), "speculative": LLM(**common, **engine_args(draft_dir, gamma))}
        os.environ[EU_SWITCH] = "1"
        engines["speculative + EU"] = LLM(**common, **engine_args(draft_dir, gamma))
        times = {name: [] for name in engines}
        tokens = {}
        for r in range(repeats + 1):  # round 0 warms up
            for name, llm in engines.items():
                start = time.perf_counter()
                outs = llm.generate(PROMPTS, params, use_tqdm=False)
                if name == "speculative + EU":
                    uncertainty(llm, outs)
                elapsed = time.perf_counter() - start
                tokens[name] = sum(len(o.outputs[0].token_ids) for o in outs)
                if r:
                    times[name].append(elapsed)
        per_token = {name: statistics.median(t) / tokens[name] for name, t in times.items()}
        for name in engines:
            rows.append({"gamma": gamma, "engine": name, "tokens_per_s": 1.0 / per_token[name]})
        rows.append({"gamma": gamma, "engine": "EU overhead per token",
                     "fraction": per_token["speculative + EU"] / per_token["speculative"] - 1.0})
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()
        del engines
        gc.collect()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gammas", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--num-drafts", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.gammas, args.num_drafts, args.max_tokens, args.repeats, Path(tmp))
    for row in rows:
        value = f"{row['tokens_per_s']:.1f} tokens/s" if "tokens_per_s" in row else f"{100 * row['fraction']:+.1f} %"
        print(f"gamma={row['gamma']}  {row['engine']:<22} {value}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
