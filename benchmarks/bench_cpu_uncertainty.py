"""CPU kernel benchmark (design §7): ``epikern bench kernels`` runs the same code; see
:mod:`epikern.eval.kernel_bench` (kernel vs the full and the lean composites, eager and
compiled; cycles per logit and the transcendental floor).

    python benchmarks/bench_cpu_uncertainty.py [--quick] [--json PATH]
"""

import sys

from epikern.eval.kernel_bench import main

if __name__ == "__main__":
    sys.exit(main())
