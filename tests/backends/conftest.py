"""Backend tests: on machines without a CUDA GPU, run the Triton kernels on Triton's CPU interpreter.

``triton.jit`` decides between compiled and interpreted kernels when a kernel is decorated, i.e.
when ``epikern.backends.triton`` is first imported; pytest imports this conftest before any test
module of this directory, so the switch is in place before the kernels are built. An explicit
``TRITON_INTERPRET`` in the environment is left alone.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
