"""Does verifying m tokens cost one decode step on this machine? ``nn.Linear`` over m rows, m = 1..9.

Speculative decoding pays only if the target's forward over the γ + 1 tokens of a round costs
about one single-token step: the weights are read once for all rows. This times ``F.linear`` at
SmolLM2-135M's shapes (hidden 576, q/k/v 960, MLP 1536, vocabulary 49152) for m rows, with the
weight in HF's ``[out, in]`` layout and in the transposed (``in_major``) one, and prints each as
ms and as a multiple of one row. On a GPU or with a BLAS tuned for small m the multiples stay
near 1; where they grow like m, a verification costs m steps and speculative decoding cannot win.

    python benchmarks/bench_verify_linear.py [--rows 1 2 3 5 9] [--threads 1] [--repeats 50]
"""

import argparse
import os

import torch
import torch.nn.functional as F

from epikern.eval.machine import machine_info
from epikern.eval.timing import median_time
from epikern.models.layers import in_major

SHAPES = {"q/k/v 576→960": (960, 576), "MLP up 576→1536": (1536, 576), "MLP down 1536→576": (576, 1536),
          "LM head 576→49152": (49152, 576)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 5, 9])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} ({args.threads} thread(s)), "
          f"BLAS: {'MKL' if torch.backends.mkl.is_available() else 'not MKL'}, median of {args.repeats}\n")
    print("| linear | layout | " + " | ".join(f"m = {m}" for m in args.rows) + " |")
    print("|---|---|" + "---|" * len(args.rows))
    gen = torch.Generator().manual_seed(0)
    for name, (out, inp) in SHAPES.items():
        weight = torch.randn(out, inp, generator=gen)
        for layout, w in (("[out, in]", weight), ("in-major", in_major(weight))):
            ms = [1e3 * median_time(lambda x=torch.randn(m, inp, generator=gen): F.linear(x, w), args.repeats, 3)
                  for m in args.rows]
            cells = [f"{t:.3f} ms ({t / ms[0]:.1f}×)" for t in ms]
            print(f"| {name} | {layout} | " + " | ".join(cells) + " |")
    print(f"\nload average {machine['loadavg_start']:.2f} → {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
