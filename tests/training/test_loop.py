"""The loop: exact resume after a SIGKILL, a kill mid-write, torchrun with 2 processes, bad resumes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from epikern.models.loading import CheckpointError
from epikern.training.checkpoint import FAULT_ENV, load_checkpoint

from . import loop_run

SCRIPT = Path(loop_run.__file__)


def _subprocess(args, fault=None, torchrun=False):
    env = {**os.environ, FAULT_ENV: fault or "", "OMP_NUM_THREADS": "1"}  # one thread, as in this process
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun
           else [sys.executable]) + [str(SCRIPT), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Weights and losses of the plain and the noisy micro run without interruption."""
    d = tmp_path_factory.mktemp("uninterrupted")
    out = {}
    for noisy in (False, True):
        model, result = loop_run.run(d / f"{noisy}.safetensors", noisy=noisy)
        out[noisy] = (_weights(model), result.losses)
    return out


def test_sigkill_then_resume_gives_the_same_weights_bit_for_bit(tmp_path, uninterrupted):
    ckpt = tmp_path / "run.safetensors"
    killed = _subprocess([ckpt, tmp_path / "unused.safetensors", "--noisy"], fault="step:5")
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILLed after step 5
    assert load_checkpoint(ckpt).step == 3  # the last checkpoint before the kill
    model, result = loop_run.run(ckpt, resume=True, noisy=True)
    assert result.start_step == 3
    weights, losses = uninterrupted[True]
    _assert_bitwise_equal(_weights(model), weights)
    assert result.losses == losses  # the noise stream and the data order continued exactly


def test_kill_mid_write_leaves_the_last_good_checkpoint(tmp_path, uninterrupted):
    ckpt = tmp_path / "run.safetensors"
    killed = _subprocess([ckpt, tmp_path / "unused.safetensors"], fault="write:2")  # the step-6 checkpoint
    assert killed.returncode == -9, killed.stderr[-2000:]
    torn = list(tmp_path.glob(".run.safetensors.tmp-*"))
    assert len(torn) == 1 and 0 < torn[0].stat().st_size  # half a file, under a temporary name
    assert load_checkpoint(ckpt).step == 3
    model, _ = loop_run.run(ckpt, resume=True)
    _assert_bitwise_equal(_weights(model), uninterrupted[False][0])
    assert not list(tmp_path.glob(".run.safetensors.tmp-*"))  # the next write cleaned it up


def test_torchrun_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, uninterrupted):
    run = _subprocess([tmp_path / "ddp.safetensors", tmp_path / "ddp-weights.safetensors"], torchrun=True)
    assert run.returncode == 0, run.stderr[-3000:]
    two = load_file(tmp_path / "ddp-weights.safetensors")
    one = uninterrupted[False][0]
    assert two.keys() == one.keys()
    for name in one:  # same steps up to float reassociation (the all-reduce sums in another order)
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4, msg=name)
    assert load_checkpoint(tmp_path / "ddp.safetensors").world_size == 2


def test_resume_with_another_config_names_the_fields_and_keeps_the_checkpoint(tmp_path):
    ckpt = tmp_path / "run.safetensors"
    loop_run.run(ckpt, config=dataclasses.replace(loop_run.CONFIG, steps=3))
    before = ckpt.read_bytes()
    other = dataclasses.replace(loop_run.CONFIG, steps=3, lr=0.5, batch_size=4)
    with pytest.raises(CheckpointError, match=r"2 fields differ: batch_size: 8 \(checkpoint\) vs 4 \(now\); "
                                              r"lr: 0\.01 \(checkpoint\) vs 0\.5 \(now\)"):
        loop_run.run(ckpt, resume=True, config=other)
    assert ckpt.read_bytes() == before


def test_resume_of_a_missing_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*nothing to resume"):
        loop_run.run(tmp_path / "none.safetensors", resume=True)
    ckpt = tmp_path / "run.safetensors"
    loop_run.run(ckpt, config=dataclasses.replace(loop_run.CONFIG, steps=2))
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is corrupt or truncated .*left untouched"):
        loop_run.run(ckpt, resume=True, config=dataclasses.replace(loop_run.CONFIG, steps=2))
    assert ckpt.read_bytes() == data[: len(data) // 2]
    ckpt.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ckpt)


def test_resume_checks_the_frozen_weights(tmp_path):
    ckpt = tmp_path / "run.safetensors"
    config = dataclasses.replace(loop_run.CONFIG, steps=2)
    model = loop_run.micro_model()
    model.model.embed_tokens.requires_grad_(False)
    from epikern.training.loop import train
    from epikern.training.losses import ForwardKL
    train(ForwardKL(model), loop_run.examples(), config, pad_id=0, run_config={}, checkpoint=ckpt,
          teacher=loop_run.RandomTeacher(), progress=False)
    other = loop_run.micro_model()
    other.model.embed_tokens.requires_grad_(False)
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(1.0)
    with pytest.raises(CheckpointError, match="frozen weights .* differ"):
        train(ForwardKL(other), loop_run.examples(), config, pad_id=0, run_config={}, checkpoint=ckpt,
              resume=True, teacher=loop_run.RandomTeacher(), progress=False)


def test_loss_goes_down_and_is_the_mean_over_counted_tokens():
    model, result = loop_run.run(None, config=dataclasses.replace(loop_run.CONFIG, steps=12, checkpoint_every=0))
    assert len(result.losses) == 12
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
