"""Training sequences, their batches and their order: what the loop consumes.

An :class:`Example` is one token sequence whose tail (from ``prompt_length`` on) is what the loss
counts: the answer of a problem (target training) or a target-generated response (distillation).
:func:`collate` right-pads a list of examples into ``input_ids``/``attention_mask``/``labels``
tensors with *shifted* labels: ``labels[b, t]`` is the token predicted at position t (``input_ids
[b, t + 1]``) where that token is counted, else ``IGNORE``, so position t's logits (or hidden state)
pair with ``labels[b, t]`` directly.

:class:`EpochSampler` fixes the data order as a pure function of ``(seed, step)``: the stream of
example indices is the concatenation of one seeded permutation per epoch, and step s takes the
global batch ``stream[s·B : (s+1)·B]``. :func:`shard` splits that global batch across processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

#: Label of positions the loss ignores (prompt, padding, the last position): ``ignore_index``.
IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One training sequence: ``input_ids`` (prompt then counted tokens) and the prompt's length.

    The loss counts the predictions of tokens ``input_ids[prompt_length:]``, i.e. positions
    ``prompt_length − 1 .. len − 2``.
    """

    input_ids: tuple[int, ...]
    prompt_length: int

    def __post_init__(self):
        if not 1 <= self.prompt_length < len(self.input_ids):
            raise ValueError(f"an example needs 1 <= prompt_length < len(input_ids) = {len(self.input_ids)} "
                             f"(a non-empty prompt and at least one counted token), got {self.prompt_length}")

    @property
    def num_targets(self) -> int:
        """Tokens the loss counts."""
        return len(self.input_ids) - self.prompt_length


def collate(examples: Sequence[Example], pad_id: int, device=None) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and shifted ``labels``, each ``[B, T_max]``."""
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        row = torch.tensor(e.input_ids, dtype=torch.long)
        ids[b, :n] = row
        mask[b, :n] = 1
        labels[b, e.prompt_length - 1:n - 1] = row[e.prompt_length:]
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


class EpochSampler:
    """Global batches of example indices, a pure function of ``(seed, step)``.

    Epoch e is ``numpy.random.default_rng([seed, e]).permutation(n)``; the batches walk the
    concatenated epochs ``batch_size`` indices at a time (a batch may straddle two epochs).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if num_examples < 1:
            raise ValueError(f"there are no training examples (num_examples={num_examples})")
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed

    def epoch(self, e: int) -> np.ndarray:
        return np.random.default_rng([self.seed, e]).permutation(self.n)

    def batch(self, step: int) -> list[int]:
        """The ``batch_size`` example indices of optimizer step ``step`` (0-based)."""
        start, stop = step * self.batch_size, (step + 1) * self.batch_size
        out = []
        for e in range(start // self.n, (stop - 1) // self.n + 1):
            lo, hi = max(start - e * self.n, 0), min(stop - e * self.n, self.n)
            out.extend(self.epoch(e)[lo:hi].tolist())
        return out


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Process ``rank``'s contiguous share of a global batch (the batch must split evenly)."""
    if len(indices) % world_size:
        raise ValueError(f"the global batch of {len(indices)} sequences does not split evenly across "
                         f"{world_size} processes; choose a batch size divisible by {world_size}")
    per = len(indices) // world_size
    return list(indices[rank * per:(rank + 1) * per])


def partition_prompts(num_prompts: int, partitions: int, seed: int) -> list[list[int]]:
    """DDD's disjoint prompt partitions: a seeded permutation of ``0..P-1`` cut into ``a`` near-equal parts.

    Every prompt lies in exactly one partition (so all R responses of a prompt go together).

    Raises:
        ValueError: ``partitions < 1``, or more partitions than prompts.
    """
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"the number of DDD partitions must be a positive int, got {partitions!r}")
    if partitions > num_prompts:
        raise ValueError(f"cannot cut {num_prompts} prompt(s) into {partitions} disjoint non-empty partitions: "
                         f"more partitions than prompts (use --ddd a×b with a <= {num_prompts}, or more prompts)")
    order = np.random.default_rng([seed, 0xDDD]).permutation(num_prompts)
    return [sorted(part.tolist()) for part in np.array_split(order, partitions)]
