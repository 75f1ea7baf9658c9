"""``epikern train``: the tiny target, DDD/IDD drafts and the OSD proxy from the command line.

    epikern train target --out runs/target [--quick]
    epikern train drafts --target runs/target --out runs/ddd --ddd 2x2 [--shared-layers 1] [--quick]
    epikern train drafts --target runs/target --out runs/idd --ddd 2x2 --idd [--quick]
    epikern train drafts --target runs/target --out runs/ddd-osd --ddd 2x2 --osd [--quick]
    epikern train drafts --target runs/target --out runs/psd --ddd 1x4 --idd --psd        # posterior samples
    epikern train drafts --target runs/target --out runs/skip --ddd 2x2 --layer-skip      # self-speculative
    epikern train proxy  --target runs/target --out runs/proxy [--quick]

    # a real target on a CPU: few GSM8K prompts, short responses (or --responses reference)
    epikern train drafts --target smollm2 --out runs/smol-ddd --ddd 2x1 --shared-layers 2 \\
        --prompts 4 --max-new-tokens 32 --steps 10 --batch-size 2

    # two processes (gloo on CPU, nccl on GPUs); the global batch is split between them
    torchrun --nproc_per_node 2 -m epikern.training drafts --target runs/target --out runs/ddd --ddd 2x2

Every run writes its recipe and checkpoints into --out; --resume continues a killed run exactly
(the same config is required), and a directory holding another run is never written over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

from ..models.loading import CheckpointError
from . import presets


def ddd_spec(text: str) -> tuple[int, int]:
    """``"AxB"`` (or ``A×B``) → ``(A, B)`` with A, B ≥ 1."""
    match = re.fullmatch(r"\s*(\d+)\s*[x×X]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--ddd must look like AxB (partitions x drafts per partition), got {text!r}")
    a, b = int(match[1]), int(match[2])
    if a < 1 or b < 1:
        raise argparse.ArgumentTypeError(f"--ddd {text}: need at least 1 partition and 1 draft per partition "
                                         f"(K = A·B drafts), got A={a}, B={b}")
    return a, b


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` (with ``target``, ``drafts``, ``proxy``) to an argparse subparsers object."""
    parser = subparsers.add_parser("train", help="train the tiny target, DDD/IDD drafts or the OSD proxy",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipes = parser.add_subparsers(dest="recipe", required=True)

    target = recipes.add_parser("target", help="the tiny target on the synthetic task, and its responses")
    _common(target)
    target.add_argument("--layers", type=int, help="decoder layers of the tiny target (default 6; --quick: 3)")

    drafts = recipes.add_parser("drafts", help="K = A·B drafts distilled from the target (DDD, IDD, OSD)")
    _common(drafts)
    _distillation(drafts)
    drafts.add_argument("--ddd", type=ddd_spec, required=True, metavar="AxB",
                        help="A disjoint prompt partitions x B drafts per partition (different seeds)")
    drafts.add_argument("--idd", action="store_true",
                        help="identical data: every draft trains on all prompts (same steps as DDD, own seed)")
    drafts.add_argument("--shared-layers", type=int, help="S: the target's embedding + first S layers, frozen, "
                                                          "shared by all drafts (default 1)")
    drafts.add_argument("--branch-layers", type=int, help="layers of each draft after the trunk (default 1)")
    drafts.add_argument("--osd", action="store_true", help="distil from the perturbed target, fresh noise each step")
    drafts.add_argument("--jitter", type=float, help="initial noise of a draft's branch, x rms(W) (default 0.02)")
    drafts.add_argument("--draft-init", metavar="MODEL",
                        help="initialise the drafts from this model (same vocabulary) instead of the target")
    drafts.add_argument("--layer-skip", action="store_true",
                        help="branch initialised from the target's LAST layers (a draft = the target minus its middle)")
    drafts.add_argument("--psd", action="store_true", help="posterior-sample distillation: draft k imitates the target "
                                                           "under its own fixed draw of TokUR's perturbation")
    drafts.add_argument("--more-responses", type=int,
                        help="extra responses per prompt sampled from the target (a larger distillation set)")

    proxy = recipes.add_parser("proxy", help="the OSD proxy: the target distilled to its perturbed average")
    _common(proxy)
    _distillation(proxy)
    parser.set_defaults(func=main)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (must be empty unless --resume)")
    p.add_argument("--quick", action="store_true", help="the small preset (fewer steps and examples)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (same config) exactly")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--steps", type=int, help="optimizer steps (per draft)")
    p.add_argument("--batch-size", type=int, help="global batch in sequences")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--seed", type=int, help="seed of data order, init jitter and noise")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0: only the last)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; 1 suits the tiny models)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _distillation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="HF directory, .gguf file or 'smollm2'")
    p.add_argument("--responses", help="'target' (sample now), 'reference' (GSM8K solutions) or a responses.jsonl; "
                                       "default: the target directory's responses.jsonl, else 'target'")
    p.add_argument("--prompts", type=int, help="GSM8K train prompts when responses are made here")
    p.add_argument("--responses-per-prompt", type=int, help="R sampled responses per prompt")
    p.add_argument("--max-new-tokens", type=int, help="length cap of a sampled response")
    p.add_argument("--osd-members", type=int, help="perturbed members averaged per step by the OSD teacher")
    p.add_argument("--sigma", type=float, help="TokUR noise scale (default 0.1)")
    p.add_argument("--rank", type=int, help="TokUR noise rank r (default 8)")


#: argparse dest -> recipe field, for the options that override a preset's field.
_FIELDS = {"responses": "responses", "prompts": "prompts", "responses_per_prompt": "responses_per_prompt",
           "max_new_tokens": "max_new_tokens", "osd_members": "osd_members", "sigma": "sigma", "rank": "rank",
           "shared_layers": "shared_layers", "branch_layers": "branch_layers", "jitter": "jitter",
           "draft_init": "draft_init", "more_responses": "more_responses"}
_TRAIN_FIELDS = {"steps": "steps", "batch_size": "batch_size", "lr": "lr", "seed": "seed",
                 "checkpoint_every": "checkpoint_every"}


def recipe_from_args(args: argparse.Namespace):
    """The recipe dataclass for ``args``: the preset (``--quick`` or default) with the options applied."""
    base = {"target": presets.target, "drafts": presets.drafts, "proxy": presets.proxy}[args.recipe](args.quick)
    fields = {f.name for f in dataclasses.fields(base)}
    overrides = {field: getattr(args, dest) for dest, field in _FIELDS.items()
                 if field in fields and getattr(args, dest, None) is not None}
    if "target" in fields:
        overrides["target"] = args.target
    if args.recipe == "drafts":
        overrides.update(partitions=args.ddd[0], drafts_per_partition=args.ddd[1], idd=args.idd, osd=args.osd,
                         psd=args.psd, layer_skip=args.layer_skip)
    if getattr(args, "layers", None) is not None:
        if args.layers < 1:
            raise ValueError(f"--layers must be >= 1, got {args.layers}")
        overrides["model"] = dataclasses.replace(base.model, num_layers=args.layers)
    train = {field: getattr(args, dest) for dest, field in _TRAIN_FIELDS.items() if getattr(args, dest) is not None}
    if train:
        steps = train.get("steps", base.train.steps)
        train.setdefault("warmup_steps", min(base.train.warmup_steps, steps))
        overrides["train"] = dataclasses.replace(base.train, **train)
    return dataclasses.replace(base, **overrides)


def main(args: argparse.Namespace) -> int:
    """Run ``epikern train <recipe>``; 0 on success, 2 on bad input (the message on stderr).

    Under torchrun every process runs this; the process group is closed at the end.
    """
    import torch
    import torch.distributed

    from .distributed import setup

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        recipe = recipe_from_args(args)
        dist = setup(args.device)
        result = _runner(args.recipe)(recipe, args.out, resume=args.resume, dist=dist, progress=not args.no_progress)
    except (ValueError, CheckpointError) as exc:
        print(f"epikern train {args.recipe}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if dist.is_main:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _runner(recipe: str):
    if recipe == "target":
        from .target import train_target
        return train_target
    if recipe == "drafts":
        from .drafts import train_drafts
        return train_drafts
    from .proxy import train_proxy
    return train_proxy


def build_parser(prog: str = "epikern") -> argparse.ArgumentParser:
    """A top-level parser holding only the ``train`` command (what ``python -m epikern.training`` parses)."""
    top = argparse.ArgumentParser(prog=prog)
    sub = top.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return top


def run_module(argv=None) -> int:
    """``python -m epikern.training <recipe> ...`` (what torchrun runs): ``epikern train <recipe> ...``."""
    args = build_parser().parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
