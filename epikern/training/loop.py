"""The training loop: AdamW, warmup + cosine, clipping, bf16 autocast on CUDA, checkpoints, resume, DDP.

One function, read top to bottom (nanoGPT style). Every recipe (target, drafts, proxy) calls it with
an objective (:mod:`epikern.training.losses`), its examples and a :class:`TrainConfig`:

    result = train(CrossEntropy(model), examples, config, pad_id=tok.pad_token_id,
                   run_config=to_dict(recipe), checkpoint=out / "checkpoints" / "target.safetensors")

Exactness. The data order is a function of ``(seed, step)``, the learning rate of the step, and the
RNG states (torch, numpy, python and the run's own generators, e.g. the OSD noise) are checkpointed
with the weights and the AdamW moments, so ``resume=True`` continues a killed run to the same
weights bit for bit on CPU. Under ``torchrun`` the *global* batch is split across processes and the
summed loss is divided by the global count of counted tokens (times the world size, which DDP's
gradient averaging divides out), so 2 processes take the same step as 1 process with the same
global batch up to float reassociation. Rank 0 writes the checkpoints and shows the progress bar.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .batches import EpochSampler, Example, collate, shard
from .checkpoint import (capture_rng, check_resumable, fault, load_checkpoint, load_model_state, restore_rng,
                         save_checkpoint)
from .config import TrainConfig
from .distributed import Distributed, setup

#: (batch, its examples) -> teacher logits at the counted rows ``[N, V]`` (see epikern.training.losses)
Teacher = Callable[[dict, Sequence[Example]], Tensor]


@dataclass
class TrainResult:
    """What :func:`train` did: the mean loss of every step (resumed steps included), where it began,
    and its throughput in tokens (padding excluded) per second (None when it ran no step)."""

    losses: list[float] = field(default_factory=list)
    start_step: int = 0
    tokens_per_second: Optional[float] = None


def train(objective: nn.Module, examples: Sequence[Example], config: TrainConfig, *, pad_id: int,
          run_config: dict, checkpoint: Optional[Path] = None, resume: bool = False,
          teacher: Optional[Teacher] = None, generators: Optional[dict[str, torch.Generator]] = None,
          dist: Optional[Distributed] = None, desc: str = "train", progress: bool = True) -> TrainResult:
    """Train ``objective``'s parameters (those with ``requires_grad``) for ``config.steps`` steps.

    Args:
        objective: an ``nn.Module`` whose forward(input_ids, attention_mask, labels, teacher_logits)
            returns the loss summed over counted positions; its parameters are what is checkpointed.
        examples: the training sequences (:class:`Example`).
        config: the loop's hyperparameters.
        pad_id: padding token id for :func:`collate`.
        run_config: the whole recipe's config dict, stored in the checkpoint and compared on resume.
        checkpoint: the checkpoint file (None: no checkpoints).
        resume: continue from ``checkpoint`` (which must exist and match ``run_config``).
        teacher: (batch, its examples) → teacher logits at the counted rows ``[N, V]``
            (distillation), computed without gradient.
        generators: the run's own random streams (checkpointed by name, restored on resume).
        dist: the process group (default: :func:`setup` with CUDA when available).
        desc: progress-bar label.

    Returns:
        :class:`TrainResult`. The trained weights are in ``objective`` itself.

    Raises:
        CheckpointError: ``resume`` without a readable checkpoint, or a checkpoint of another config.
        ValueError: a global batch that does not split evenly across processes.
    """
    dist = dist or setup()
    generators = generators or {}
    device = dist.device
    objective.to(device)
    params = [p for p in objective.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the objective has no trainable parameters")
    shard(range(config.batch_size), 0, dist.world_size)  # fail early if the batch does not split

    # AdamW with decoupled weight decay on matrices only (nanoGPT): norms and biases are not decayed.
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    sampler = EpochSampler(len(examples), config.batch_size, config.seed)
    counts = np.array([e.num_targets for e in examples])

    start, losses = 0, []
    if resume:
        if checkpoint is None:
            raise ValueError("resume=True needs a checkpoint path")
        ckpt = load_checkpoint(checkpoint)
        check_resumable(ckpt, run_config, dist.world_size, bool(generators))
        load_model_state(objective, ckpt)
        optimizer.load_state_dict(ckpt.optimizer)
        restore_rng(ckpt.rng[dist.rank if ckpt.world_size == dist.world_size else 0], generators)
        start, losses = ckpt.step, list(ckpt.losses)
    else:
        torch.manual_seed(config.seed + dist.rank)
        np.random.seed(config.seed + dist.rank)
        random.seed(config.seed + dist.rank)
    if start >= config.steps:
        return TrainResult(losses, start)

    model = objective
    if dist.world_size > 1:
        model = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    objective.train()
    bar = tqdm(total=config.steps, initial=start, desc=desc, disable=not (progress and dist.is_main),
               dynamic_ncols=True, leave=True)
    tokens, t0 = 0, time.perf_counter()
    for step in range(start, config.steps):
        lr = config.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # this step's global batch, this process's share of it
        indices = sampler.batch(step)
        global_count = int(counts[indices].sum())
        local = [examples[i] for i in shard(indices, dist.rank, dist.world_size)]
        batch = collate(local, pad_id, device)
        with autocast:
            if teacher is not None:
                batch["teacher_logits"] = teacher(batch, local)
            loss_sum = model(**batch)
        (loss_sum * (dist.world_size / global_count)).backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        loss = float(dist.sum(loss_sum.float())) / global_count
        losses.append(loss)
        tokens += int(dist.sum(batch["attention_mask"].sum()))
        tokens_per_second = tokens / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}", refresh=False)
        bar.update(1)

        done = step + 1
        if checkpoint is not None and (done == config.steps or (config.checkpoint_every
                                                                and done % config.checkpoint_every == 0)):
            rng = dist.gather(capture_rng(generators))
            if dist.is_main:
                save_checkpoint(checkpoint, step=done, config=run_config, model=objective, optimizer=optimizer,
                                rng=rng, losses=losses)
            dist.barrier()
        fault("step", done)
    bar.close()
    objective.eval()
    return TrainResult(losses, start, tokens_per_second)
