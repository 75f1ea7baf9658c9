"""A micro training run for the loop tests, importable and runnable (``python loop_run.py``, torchrun).

    python tests/training/loop_run.py CHECKPOINT OUT.safetensors [--resume] [--noisy]

trains a seeded 2-layer Llama (vocabulary 40) by forward KL against a fixed random teacher on 48
random sequences (``--noisy``: the teacher gets fresh noise from a checkpointed generator every
step, like OSD) and writes the final weights to OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from epikern.training.batches import Example
from epikern.training.config import TrainConfig, to_dict
from epikern.training.distributed import setup
from epikern.training.loop import train
from epikern.training.losses import ForwardKL

CONFIG = TrainConfig(steps=8, batch_size=8, lr=1e-2, warmup_steps=2, checkpoint_every=3, seed=5)
VOCAB = 40


def micro_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(48):
        n = int(torch.randint(5, 16, (1,), generator=g))
        out.append(Example(tuple(torch.randint(4, VOCAB, (n,), generator=g).tolist()), int(torch.randint(1, 4, (1,), generator=g))))
    return out


class RandomTeacher:
    """Fixed per-token teacher logits (a function of the next token), plus fresh noise if ``generator``."""

    def __init__(self, generator=None):
        self.table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(2)) * 3
        self.generator = generator

    def __call__(self, batch, examples):
        logits = self.table[batch["input_ids"][batch["labels"] != -100]]
        if self.generator is not None:
            logits = logits + torch.randn(logits.shape, generator=self.generator)
        return logits


def run(checkpoint, *, resume=False, noisy=False, config=CONFIG, dist=None):
    """Train the micro model; returns (model, TrainResult)."""
    model = micro_model()
    generators = {"noise": torch.Generator().manual_seed(7)} if noisy else {}
    result = train(ForwardKL(model), examples(), config, pad_id=0, run_config={**to_dict(config), "noisy": noisy},
                   checkpoint=checkpoint, resume=resume, teacher=RandomTeacher(generators.get("noise")),
                   generators=generators, dist=dist, progress=False)
    return model, result


if __name__ == "__main__":
    dist = setup("cpu")
    model, _ = run(Path(sys.argv[1]), resume="--resume" in sys.argv, noisy="--noisy" in sys.argv, dist=dist)
    if dist.is_main:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, sys.argv[2])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
