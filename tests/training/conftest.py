"""Micro recipes (seconds on a CPU, not the default pipeline) and a micro target trained once per session.

The training tests run torch on one thread (restored after each module): their models are far too
small to gain from a second one, and on a busy 2-core machine two OpenMP threads stall each other.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from epikern.training.config import DraftsRecipe, ProxyRecipe, TargetRecipe, TinyModelConfig, TrainConfig

MICRO_TARGET = TargetRecipe(
    model=TinyModelConfig(hidden_size=48, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                          max_position_embeddings=256),
    synthetic={"steps": (1, 2), "digits": (1, 1), "ops": ("+", "-")},
    train_problems=400, heldout_problems=24, response_prompts=24, responses_per_prompt=2, max_new_tokens=24,
    train=TrainConfig(steps=60, batch_size=16, lr=1e-2, warmup_steps=5, checkpoint_every=30),
)
MICRO_DRAFTS = DraftsRecipe(partitions=2, drafts_per_partition=1, shared_layers=1, branch_layers=1,
                            train=TrainConfig(steps=24, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=0))
MICRO_PROXY = ProxyRecipe(train=TrainConfig(steps=24, batch_size=8, lr=1e-4, warmup_steps=2, checkpoint_every=0))


@contextlib.contextmanager
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def micro_target(tmp_path_factory):
    """``(directory, metrics)`` of the micro target (trained, evaluated, responses sampled)."""
    from epikern.training.target import train_target

    out = tmp_path_factory.mktemp("micro") / "target"
    with one_thread():
        return out, train_target(MICRO_TARGET, out, progress=False)


def micro_drafts(target_dir, **changes) -> DraftsRecipe:
    return dataclasses.replace(MICRO_DRAFTS, target=str(target_dir), **changes)


def micro_proxy(target_dir, **changes) -> ProxyRecipe:
    return dataclasses.replace(MICRO_PROXY, target=str(target_dir), **changes)
