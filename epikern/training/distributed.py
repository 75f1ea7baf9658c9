"""The process group of a training run: one process, or ``torchrun`` (gloo on CPU, nccl on CUDA).

    torchrun --nproc_per_node 2 -m epikern.training drafts ...

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` joins the group once per
process and picks this process's device (``cuda:<local_rank>`` on a GPU machine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: rank, world size and device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints and outputs and shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over processes (a copy; the input is left as it is)."""
        value = value.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(value)
        return value

    def gather(self, obj) -> list:
        """Every process's ``obj``, rank order (pickled over the process group)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def setup(device: Optional[str] = None) -> Distributed:
    """Join the ``torchrun`` process group if there is one, and choose the device.

    Args:
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available). Under torchrun on CUDA each
            process takes ``cuda:$LOCAL_RANK``.

    Raises:
        ValueError: ``device="cuda"`` on a machine without CUDA.
    """
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no CUDA device here")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Distributed(rank=rank, world_size=dist.get_world_size() if dist.is_initialized() else 1, device=dev)
