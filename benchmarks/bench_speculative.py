"""Speculative decoding with EU against plain target decoding (design §4b, §7); the code and its
options live in :mod:`epikern.eval.speculative_bench`.

    python benchmarks/bench_speculative.py [--target tiny|smollm2|DIR] [--drafts DIR|self]
                                           [--gammas 1 2 4 8] [--new-tokens 32] [--json PATH]
"""

import sys

from epikern.eval.speculative_bench import main

if __name__ == "__main__":
    sys.exit(main())
