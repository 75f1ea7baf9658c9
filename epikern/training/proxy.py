"""``epikern train proxy``: Online Stochastic Distillation of the target's perturbed average (design §1).

The proxy ``p_mix`` approximates the Bayesian model average of the perturbed targets (TokUR's noise,
design §5) that ground-truth EU is measured against. It starts as an exact copy of the target (the
average of small perturbations is close to the target, so this is where the optimum is nearest;
every parameter trains, tied embeddings stay tied) and minimises the forward KL
``KL(p_teacher ‖ q_proxy)`` on the distillation responses (:mod:`epikern.training.distill_data`),
where the teacher of every step is the mixture of ``osd_members`` perturbed targets with **fresh**
noise. Cross-entropy is linear in the teacher, so the expected gradient is that of distilling to
the average over the noise: the proxy learns the BMA without ever averaging many members at once.

Output directory (loadable by ``load_causal_lm(out)``): the HF model and tokenizer, ``recipe.json``,
``metrics.json`` (losses), ``responses.jsonl`` when generated here, ``checkpoints/proxy.safetensors``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Optional

import torch

from ..models.loading import load_causal_lm
from ..models.perturb import Perturbation
from .config import ProxyRecipe, to_dict
from .distill_data import distillation_responses, resolve_source
from .distributed import Distributed, setup
from .loop import train
from .losses import ForwardKL, PerturbedTeacher
from .outputs import claim, save_pretrained, write_json

CHECKPOINT = Path("checkpoints") / "proxy.safetensors"
METRICS_NAME = "metrics.json"


def train_proxy(recipe: ProxyRecipe, out: Path, *, resume: bool = False, dist: Optional[Distributed] = None,
                progress: bool = True) -> dict:
    """Train the OSD proxy of ``recipe.target`` into ``out``; returns ``metrics.json``'s dict.

    Raises:
        CheckpointError: ``out`` holds another run; ``resume`` of a missing, corrupt or different run.
        ValueError: responses with ids outside the target's vocabulary.
    """
    dist = dist or setup()
    recipe = dataclasses.replace(recipe, responses=resolve_source(recipe.responses, recipe.target))
    t0 = time.perf_counter()
    target, tokenizer = load_causal_lm(recipe.target, device=dist.device)
    target.requires_grad_(False)
    out = claim(Path(out), to_dict(recipe), resume=resume, dist=dist)
    responses = distillation_responses(recipe, target, tokenizer, out, dist)

    proxy = copy.deepcopy(target).requires_grad_(True).train()
    noise = torch.Generator(device=dist.device).manual_seed(recipe.train.seed * 65_537 + dist.rank)
    teacher = PerturbedTeacher(Perturbation(target, rank=recipe.rank, sigma=recipe.sigma), recipe.osd_members, noise)
    result = train(ForwardKL(proxy), [r.example() for r in responses], recipe.train, pad_id=tokenizer.pad_token_id,
                   run_config=to_dict(recipe), checkpoint=out / CHECKPOINT, resume=resume and (out / CHECKPOINT).is_file(),
                   teacher=teacher, generators={"osd_noise": noise}, dist=dist, desc="OSD proxy", progress=progress)
    metrics = {"first_loss": result.losses[0], "final_loss": result.losses[-1], "responses": len(responses),
               "seconds": time.perf_counter() - t0}
    if dist.is_main:
        save_pretrained(proxy.eval(), out, tokenizer)
        write_json(out / METRICS_NAME, metrics)
    dist.barrier()
    return metrics
