"""``ek.draft_uncertainty_rows`` against the dense op plus the gather a user would otherwise write.

An engine keeps its logits as flat rows with index maps. Without the rows op, scoring them takes
``draft_logits.index_select(1, rows)`` and ``target_logits.index_select(0, rows)`` (copies of every
selected V-wide row), then ``ek.draft_uncertainty`` on the copies, and NaN on the padding rows.
The rows op reads the rows in place through the maps. Layouts (bf16 logits, K drafts):

* ``vLLM V1``: target ``[B·γ + B, V]`` request-major with bonus rows, ``target_logits_indices``;
* ``vLLM V2``: drafts ``[K, max_reqs, γ, V]`` by request slot, target as V1;
* ``SGLang``: ``[B·γ, V]`` for both, the last request padding (−1).

Both contestants are timed in the same rounds, alternating (:mod:`epikern.eval.timing`: the median
of every call over the rounds), so that load from other processes falls on both alike.

    python benchmarks/bench_draft_uncertainty_rows.py [--vocab 49152 128256] [--threads 1]
"""

import argparse
import os

import torch

import epikern as ek
from epikern.eval.machine import machine_info
from epikern.eval.timing import Case, interleaved_medians


def layouts(K: int, B: int, gamma: int, V: int, max_reqs: int, gen: torch.Generator) -> dict:
    """name → (draft_logits, target_logits, draft_rows, target_rows) for B requests of γ drafts."""
    def logits(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    N = B * gamma
    bonus_skipped = torch.tensor([r * (gamma + 1) + j for r in range(B) for j in range(gamma)])
    slots = torch.randperm(max_reqs, generator=gen)[:B]
    by_slot = (slots[:, None] * gamma + torch.arange(gamma)).reshape(-1)
    padded = torch.arange(N)
    padded[-gamma:] = -1
    return {
        "vLLM V1": (logits(K, N, V), logits(N + B, V), None, bonus_skipped.to(torch.int32)),
        "vLLM V2": (logits(K, max_reqs, gamma, V), logits(N + B, V), by_slot, bonus_skipped),
        "SGLang": (logits(K, N, V), logits(N, V), None, padded),
    }


def gather_then_dense(draft, target, draft_rows, target_rows):
    """What a user writes without the rows op: copy the selected rows, score, NaN the padding."""
    K, V = draft.shape[0], draft.shape[-1]
    draft = draft.reshape(K, -1, V)
    n = (draft_rows if draft_rows is not None else target_rows).shape[0]
    d_idx = torch.arange(n) if draft_rows is None else draft_rows
    t_idx = torch.arange(n) if target_rows is None else target_rows
    valid = (d_idx >= 0) & (t_idx >= 0)
    u = ek.draft_uncertainty(draft.index_select(1, d_idx.clamp(min=0)), target.index_select(0, t_idx.clamp(min=0)))
    return torch.where(valid, u.eu, torch.full((), float("nan")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--drafts", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--max-reqs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {args.threads} thread(s); "
          f"K = {args.drafts}, B = {args.batch}, γ = {args.gamma} (N = {args.batch * args.gamma} rows), bf16; "
          f"median of {args.rounds} interleaved rounds × {args.per_round} calls\n")
    print("| layout | V | rows op | gather + dense op | gather + dense ÷ rows op |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for V in args.vocab:
        for name, (draft, target, d_rows, t_rows) in layouts(args.drafts, args.batch, args.gamma, V,
                                                             args.max_reqs, gen).items():
            n = (d_rows if d_rows is not None else t_rows).shape[0]
            out = torch.empty(7 + args.drafts, n)
            rows_op = ek.draft_uncertainty_rows(draft, target, draft_rows=d_rows, target_rows=t_rows, out=out).eu
            torch.testing.assert_close(rows_op, gather_then_dense(draft, target, d_rows, t_rows),
                                       atol=1e-4, rtol=1e-4, equal_nan=True)
            seconds = interleaved_medians({
                "rows": Case(lambda: ek.draft_uncertainty_rows(draft, target, draft_rows=d_rows, target_rows=t_rows,
                                                               out=out), calls_per_round=args.per_round),
                "gather": Case(lambda: gather_then_dense(draft, target, d_rows, t_rows), calls_per_round=args.per_round),
            }, args.rounds, warmup=0)
            ms = {name: 1e3 * s for name, s in seconds.items()}
            print(f"| {name} | {V} | {ms['rows']:.2f} ms | {ms['gather']:.2f} ms | {ms['gather'] / ms['rows']:.2f}× |")
    print(f"\nload average {machine['loadavg_start']:.2f} → {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
