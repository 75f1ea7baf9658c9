"""``epikern train drafts``: DDD (a×b) and IDD drafts distilled from the target with forward KL.

**Data** (design §1). The responses (:mod:`epikern.training.distill_data`) are grouped by prompt and
the P prompts are cut into ``a`` disjoint partitions (:func:`epikern.training.batches.partition_prompts`;
all R responses of a prompt stay together). Draft ``k = i·b + j`` (partition i, replica j) trains
on partition i's responses with seed ``seed + k``. **IDD** (``--idd``): every draft trains on the
responses of *all* P prompts, the same steps, batch and per-draft seed as its DDD counterpart; so
DDD and IDD differ only in which data a draft sees.

**Architecture.** A draft is the target's architecture with ``S + n`` layers (``--shared-layers S``,
``--branch-layers n``), initialised from the target's embedding, its first ``S + n`` decoder layers,
its final norm and (untied) LM head. The embedding and the first S layers are the **trunk**:
frozen, identical in every draft, so the K drafts stack into one :class:`~epikern.DraftEnsemble`
that runs them once (S = 0 still shares the frozen embedding: a DraftEnsemble always does). The
branch layers, final norm and LM head train, starting from the target's weights plus Gaussian
jitter of ``jitter · rms(W)`` from the draft's seed. ``--draft-init PATH`` takes the drafts (and
their trunk) from another model of the target's vocabulary instead. ``--layer-skip`` initialises
the branch from the source's *last* n layers ``L − n .. L − 1`` instead of layers ``S .. S + n − 1``:
a draft starts as the target with its middle skipped (self-speculative drafts).

**Loss.** ``KL(p_target ‖ q_draft)`` on the response tokens (prompt and padding ignored) through
``ek.fused_linear_forward_kl``; the teacher is the clean target (its logits cached per response),
with ``--osd`` the mixture of ``osd_members`` perturbed targets with fresh noise every step, or with
``--psd`` (posterior-sample distillation) the target under draft k's own fixed draw of TokUR's
perturbation (:func:`posterior_sample_noise`; its logits cached per response, like the clean ones).

**Efficiency.** Each draft trains as its own small HF model (one after another; under torchrun the
global batch is split across processes); the clean teacher's logits are computed once per response
and shared by all K drafts; the trained drafts are stacked with ``DraftEnsemble.from_models`` at
the end. Each draft has its own checkpoint, so a resumed run skips finished drafts.

Output directory::

    draft_ensemble.json, model.safetensors   DraftEnsemble.save_pretrained (load: DraftEnsemble.from_pretrained)
    tokenizer*.json                          the target's tokenizer
    recipe.json, drafts.json                 the recipe; per draft: partition, seed, data, losses
    responses.jsonl                          when generated here; checkpoints/draft-<k>.safetensors
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..models import DraftEnsemble
from ..models.loading import load_causal_lm
from ..models.perturb import Perturbation
from .batches import partition_prompts
from .config import DraftsRecipe, to_dict
from .distill_data import distillation_responses, prompt_count, resolve_source
from .distributed import Distributed, setup
from .loop import train
from .losses import CleanTeacher, ForwardKL, PerturbedTeacher, PosteriorSampleTeacher, check_same_vocab
from .outputs import claim, save_pretrained, write_json

DRAFTS_NAME = "drafts.json"


def check_draft_layers(num_layers: int, shared_layers: int, branch_layers: int) -> None:
    """Raises ValueError unless ``S >= 0``, ``n >= 1`` and ``S + n <= num_layers`` (of the source model)."""
    if not (isinstance(shared_layers, int) and isinstance(branch_layers, int)) or shared_layers < 0 \
            or branch_layers < 1 or shared_layers + branch_layers > num_layers:
        raise ValueError(f"a draft needs shared_layers >= 0, branch_layers >= 1 and shared_layers + branch_layers "
                         f"<= {num_layers} (the layers of the model it is built from), got --shared-layers "
                         f"{shared_layers} and --branch-layers {branch_layers}")


def build_draft(source: nn.Module, *, shared_layers: int, branch_layers: int, seed: int,
                jitter: float, layer_skip: bool = False) -> nn.Module:
    """A draft of ``source``'s architecture with ``S + n`` layers, initialised from ``source``.

    Draft layer i is source layer i for the trunk (i < S); the branch (``S ≤ i < S + n``) copies
    source layer i, or with ``layer_skip`` source layer ``L − n + (i − S)`` (the last n layers). The
    embedding and layers ``0..S-1`` are frozen (``requires_grad=False``); the branch, the final norm
    and the (untied) LM head train, perturbed by ``jitter · rms(W) · N(0, 1)`` noise from
    ``torch.Generator().manual_seed(seed)``.

    Raises:
        ValueError: ``S < 0``, ``n < 1``, or ``S + n`` more layers than ``source`` has.
    """
    num_layers = source.config.num_hidden_layers
    check_draft_layers(num_layers, shared_layers, branch_layers)
    layers = draft_source_layers(num_layers, shared_layers, branch_layers, layer_skip)
    config = copy.deepcopy(source.config)
    config.num_hidden_layers = len(layers)
    config.tie_word_embeddings = False
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers]
    dtype = source.get_output_embeddings().weight.dtype
    draft = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = source.state_dict()
    layer_key = re.compile(r"(^|\.)layers\.(\d+)\.")
    renamed = lambda key: layer_key.sub(lambda m: f"{m[1]}layers.{layers[int(m[2])]}.", key, count=1)  # noqa: E731
    draft.load_state_dict({k: state[renamed(k)] for k in draft.state_dict()}, strict=True)
    frozen = [draft.get_decoder().embed_tokens, *draft.get_decoder().layers[:shared_layers]]
    for module in frozen:
        module.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            if p.requires_grad and jitter > 0:
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                p.add_((noise * jitter * p.float().pow(2).mean().sqrt()).to(p.dtype))
    return draft.to(source.device).train()


def draft_source_layers(num_layers: int, shared_layers: int, branch_layers: int, layer_skip: bool) -> list[int]:
    """The source layer of each draft layer: ``[0..S-1] + [S..S+n-1]``, or with ``layer_skip``
    ``[0..S-1] + [L-n..L-1]``."""
    first = num_layers - branch_layers if layer_skip else shared_layers
    return list(range(shared_layers)) + list(range(first, first + branch_layers))


def posterior_sample_noise(perturbation: Perturbation, seed: int) -> torch.Tensor:
    """PSD's fixed draw ε ``[L, 2, r]`` of TokUR's perturbation for the draft of seed ``seed``.

    One ε per layer and projection, the same at every token: with TokUR's clean-KV semantics a
    token's distribution depends only on the noise at its own column, so every token of the
    teacher is a sample of the ground truth's perturbation family, and the whole teacher is one
    fixed member of it (a posterior sample).
    """
    L, two, _, _, _, r = perturbation.noise_shape(1, 1, 1)
    generator = torch.Generator().manual_seed(seed * 65_537 + 0x95D)
    return torch.randn((L, two, r), generator=generator)


def check_ddd(partitions: int, drafts_per_partition: int) -> None:
    """Raises ValueError unless a and b of ``--ddd a×b`` are positive ints (names the bad one)."""
    for name, v in (("partitions (a of --ddd a×b)", partitions),
                    ("drafts per partition (b of --ddd a×b)", drafts_per_partition)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"the number of {name} must be a positive int, got {v!r}")


def plan(recipe: DraftsRecipe, num_prompts: int) -> list[dict]:
    """Per draft: index k, partition, seed and the prompt indices it trains on (IDD: all prompts).

    Raises:
        ValueError: a or b < 1; more partitions than prompts.
    """
    check_ddd(recipe.partitions, recipe.drafts_per_partition)
    a, b = recipe.partitions, recipe.drafts_per_partition
    parts = [list(range(num_prompts))] * a if recipe.idd else partition_prompts(num_prompts, a, recipe.train.seed)
    return [{"draft": i * b + j, "partition": None if recipe.idd else i, "replica": j,
             "seed": recipe.train.seed + i * b + j, "prompts": parts[i]}
            for i in range(a) for j in range(b)]


def train_drafts(recipe: DraftsRecipe, out: Path, *, resume: bool = False, dist: Optional[Distributed] = None,
                 progress: bool = True) -> dict:
    """Train the K = a·b drafts of ``recipe`` into ``out`` (see the module docstring).

    Returns ``drafts.json``'s dict. ``recipe.responses`` may be ``""`` (resolved here and recorded).

    Raises:
        ValueError: a bad a×b, more partitions than prompts, a ``draft_init`` model of another
            vocabulary, responses with ids outside the target's vocabulary.
        CheckpointError: ``out`` holds another run; ``resume`` of a missing, corrupt or different run.
    """
    dist = dist or setup()
    recipe = dataclasses.replace(recipe, responses=resolve_source(recipe.responses, recipe.target))
    check_ddd(recipe.partitions, recipe.drafts_per_partition)  # before loading or writing anything
    t0 = time.perf_counter()
    target, tokenizer = load_causal_lm(recipe.target, device=dist.device)
    target.requires_grad_(False)
    source = target
    if recipe.draft_init:
        source, _ = load_causal_lm(recipe.draft_init, device=dist.device, tokenizer=False)
        check_same_vocab(source, target, "draft")
    check_draft_layers(source.config.num_hidden_layers, recipe.shared_layers, recipe.branch_layers)
    plan(recipe, prompt_count(recipe, target))  # every check before anything is written
    out = claim(Path(out), to_dict(recipe), resume=resume, dist=dist)
    responses = distillation_responses(recipe, target, tokenizer, out, dist)
    prompts = sorted({r.prompt for r in responses})
    by_prompt = {p: [r.example() for r in responses if r.prompt == p] for p in prompts}
    drafts_plan = plan(recipe, len(prompts))

    clean = CleanTeacher(target)
    perturbation = Perturbation(target, rank=recipe.rank, sigma=recipe.sigma) if recipe.osd or recipe.psd else None
    drafts, report = [], []
    for entry in drafts_plan:
        k = entry["draft"]
        examples = [e for i in entry["prompts"] for e in by_prompt[prompts[i]]]
        draft = build_draft(source, shared_layers=recipe.shared_layers, branch_layers=recipe.branch_layers,
                            seed=entry["seed"], jitter=recipe.jitter, layer_skip=recipe.layer_skip)
        generators, teacher = {}, clean
        if recipe.osd:
            noise = torch.Generator(device=dist.device).manual_seed(entry["seed"] * 65_537 + dist.rank)
            generators, teacher = {"osd_noise": noise}, PerturbedTeacher(perturbation, recipe.osd_members, noise)
        elif recipe.psd:
            teacher = PosteriorSampleTeacher(perturbation, posterior_sample_noise(perturbation, entry["seed"]))
        checkpoint = out / "checkpoints" / f"draft-{k}.safetensors"
        result = train(ForwardKL(draft), examples, dataclasses.replace(recipe.train, seed=entry["seed"]),
                       pad_id=tokenizer.pad_token_id, run_config={**to_dict(recipe), "draft": k},
                       checkpoint=checkpoint, resume=resume and checkpoint.is_file(), teacher=teacher,
                       generators=generators, dist=dist, desc=f"draft {k + 1}/{len(drafts_plan)}", progress=progress)
        drafts.append(draft.eval())
        report.append({**entry, "examples": len(examples), "final_loss": result.losses[-1],
                       "first_loss": result.losses[0]})
    summary = {"num_drafts": len(drafts), "shared_layers": recipe.shared_layers, "idd": recipe.idd,
               "osd": recipe.osd, "psd": recipe.psd, "layer_skip": recipe.layer_skip, "prompts": len(prompts),
               "responses": len(responses), "drafts": report,
               "seconds": time.perf_counter() - t0}
    if dist.is_main:
        ensemble = DraftEnsemble.from_models(drafts, shared_layers=recipe.shared_layers)
        save_pretrained(ensemble, out, tokenizer)
        write_json(out / DRAFTS_NAME, summary)
    dist.barrier()
    return summary
