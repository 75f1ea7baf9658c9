"""The whole tiny pipeline in one call, cached: target → responses → DDD drafts → IDD drafts → OSD proxy.

    models = build_tiny(quick=True)        # trains on the first call (progress bars), then re-uses
    models.target, models.drafts_ddd, models.drafts_idd, models.proxy, models.heldout

The outputs live under ``<out_dir>/tiny-<key>/`` where ``key`` hashes every recipe of the pipeline
(so a changed preset trains afresh, and ``--quick`` and default runs coexist); ``pipeline.json``,
written last, marks a complete build and holds its paths, metrics and timings. A second call with
the same recipes finds it and trains nothing. A killed build resumes stage by stage (each stage
resumes from its own checkpoints). A stage whose recipe equals that of a finished stage of another
build in the same ``out_dir`` (the target, when only the drafts' recipes changed) is copied from
it instead of trained again (:func:`reuse_stage`). The default ``out_dir`` is ``<cache_dir()>/tiny``
(``$EPIKERN_CACHE_DIR``, else ``~/.cache/epikern``). Concurrent builds of one key are not supported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..models import DraftEnsemble
from ..models.loading import cache_dir, load_causal_lm
from ..models.perturb import Perturbation
from . import presets
from .config import DraftsRecipe, ProxyRecipe, TargetRecipe, to_dict
from .diagnostics import kl_to_perturbed_average, mean_jsd
from .distributed import Distributed, setup
from .drafts import DRAFTS_NAME, train_drafts
from .outputs import RECIPE_NAME, write_json
from .proxy import METRICS_NAME as PROXY_METRICS
from .proxy import train_proxy
from .responses import RESPONSES_NAME
from .target import HELDOUT_NAME, METRICS_NAME, heldout_examples, read_heldout, train_target

PIPELINE_NAME = "pipeline.json"


@dataclass(frozen=True)
class TinyPipeline:
    """The recipes of one build (their ``target`` fields are filled in by :func:`build_tiny`)."""

    target: TargetRecipe
    ddd: DraftsRecipe
    idd: DraftsRecipe
    proxy: ProxyRecipe
    ddd_osd: Optional[DraftsRecipe] = None  #: DDD drafts distilled from the perturbed target (optional)

    def key(self) -> str:
        """12 hex digits of SHA-256 over the recipes (the cache key)."""
        text = json.dumps({f.name: None if getattr(self, f.name) is None else to_dict(getattr(self, f.name))
                           for f in dataclasses.fields(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def tiny_pipeline(quick: bool = False, *, osd_drafts: bool = False, paper: bool = False) -> TinyPipeline:
    """The default (or ``quick``) recipes: DDD 2×2 and IDD 2×2 drafts with S = 1
    (:func:`presets.embedded_drafts`, or with ``paper`` the paper's :func:`presets.drafts`), and the
    OSD proxy."""
    ddd = presets.drafts(quick) if paper else presets.embedded_drafts(quick)
    return TinyPipeline(target=presets.target(quick), ddd=ddd, idd=dataclasses.replace(ddd, idd=True),
                        proxy=presets.proxy(quick), ddd_osd=dataclasses.replace(ddd, osd=True) if osd_drafts else None)


@dataclass(frozen=True)
class TinyModels:
    """Where a build's outputs are (HF directories, DraftEnsemble directories, files) and its metrics."""

    root: Path
    target: Path  #: HF directory (``load_causal_lm``)
    drafts_ddd: Path  #: DraftEnsemble directory (``DraftEnsemble.from_pretrained``)
    drafts_idd: Path
    proxy: Path  #: HF directory of the OSD proxy
    drafts_ddd_osd: Optional[Path]  #: DDD drafts trained against the perturbed target, if built
    responses: Path  #: the target's sampled responses (``epikern.training.responses``)
    heldout: Path  #: held-out problems with the target's greedy answers, graded
    metrics: dict  #: target accuracy, per-stage summaries and seconds


def build_tiny(out_dir: Union[str, Path, None] = None, quick: bool = False, *,
               pipeline: Optional[TinyPipeline] = None, progress: bool = True, threads: Optional[int] = 1,
               dist: Optional[Distributed] = None, label: Optional[str] = None) -> TinyModels:
    """Build (or find) the tiny target, DDD and IDD drafts and OSD proxy; see the module docstring.

    Args:
        out_dir: the cache root (default ``cache_dir() / "tiny"``).
        quick: the ``--quick`` presets (ignored when ``pipeline`` is given).
        pipeline: explicit recipes (e.g. smaller ones in tests).
        label: the build directory's label (default ``"custom"`` with ``pipeline``, else ``"quick"``
            or ``"default"``); the directory is ``tiny-<label>-<key>``.
        progress: progress bars.
        threads: torch's intra-op threads while building (restored afterwards; None: leave them).
            One by default: the tiny models' matrices are too small to gain from more, and on a
            busy machine two OpenMP threads on two cores stall each other (several times slower).
    """
    label = label or ("custom" if pipeline is not None else "quick" if quick else "default")
    pipeline = pipeline or tiny_pipeline(quick)
    root = Path(out_dir or cache_dir() / "tiny") / f"tiny-{label}-{pipeline.key()}"
    marker = root / PIPELINE_NAME
    if marker.is_file():
        return _models(root, json.loads(marker.read_text()))
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _build(root, label, pipeline, progress, dist or setup())
    finally:
        torch.set_num_threads(previous)


def _build(root: Path, label: str, pipeline: TinyPipeline, progress: bool, dist: Distributed) -> TinyModels:
    marker = root / PIPELINE_NAME
    root.mkdir(parents=True, exist_ok=True)
    t0, seconds, metrics = time.perf_counter(), {}, {}
    target_dir = root / "target"
    stages = [("target", train_target, pipeline.target, target_dir, METRICS_NAME)]
    for name, recipe in (("drafts_ddd", pipeline.ddd), ("drafts_idd", pipeline.idd), ("proxy", pipeline.proxy),
                         ("drafts_ddd_osd", pipeline.ddd_osd)):
        if recipe is not None:
            run = train_proxy if name == "proxy" else train_drafts
            done = PROXY_METRICS if name == "proxy" else DRAFTS_NAME
            stages.append((name, run, dataclasses.replace(recipe, target=str(target_dir)), root / name, done))
    for name, run, recipe, out, done in stages:
        start = time.perf_counter()
        if not (out / done).is_file() and dist.is_main:
            reuse_stage(root, name, recipe, out, done)
        dist.barrier()
        if (out / done).is_file():
            metrics[name] = json.loads((out / done).read_text())
            continue
        resume = (out / RECIPE_NAME).is_file()
        if not resume and out.exists():
            shutil.rmtree(out)  # a stage killed before it wrote its recipe holds nothing worth keeping
        metrics[name] = run(recipe, out, resume=resume, dist=dist, progress=progress)
        seconds[name] = time.perf_counter() - start
    start = time.perf_counter()
    record = {"key": pipeline.key(), "preset": label, "seconds": seconds, "metrics": metrics,
              "stages": [name for name, *_ in stages]}
    if dist.is_main:
        record["diagnostics"] = diagnose(_models(root, record), pipeline.proxy)
    seconds["diagnostics"] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - t0
    if dist.is_main:
        write_json(marker, record)
    dist.barrier()
    return _models(root, record)


def reuse_stage(root: Path, name: str, recipe, out: Path, done: str) -> Optional[Path]:
    """Copy stage ``name`` of another finished build under ``root.parent`` whose recipe is
    ``recipe`` exactly (e.g. the target of a build whose drafts recipe changed) into ``out``.

    Only stages whose recipe names no path of their build can match (the target's); the copy is
    made under a temporary name and renamed, so a killed copy leaves nothing half-done.
    Returns the stage copied, or None.
    """
    wanted = to_dict(recipe)
    for other in sorted(root.parent.glob(f"tiny-*/{name}")):
        if other.parent == root or not (other / done).is_file() or not (other.parent / PIPELINE_NAME).is_file():
            continue
        try:
            same = json.loads((other / RECIPE_NAME).read_text()) == wanted
        except (OSError, json.JSONDecodeError):
            continue
        if same:
            if out.exists():
                shutil.rmtree(out)
            partial = out.with_name(out.name + ".copying")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(other, partial)
            partial.rename(out)
            return other
    return None


def diagnose(models: TinyModels, proxy: ProxyRecipe, *, jsd_examples: int = 128, kl_examples: int = 32,
             members: int = 16) -> dict:
    """The pipeline's claims measured on the held-out target responses (:mod:`epikern.training.diagnostics`):
    mean draft JSD of the DDD and IDD drafts (first ``jsd_examples`` responses), and KL of the proxy
    and of the target to the average of ``members`` perturbed targets (first ``kl_examples``)."""
    target, tok = load_causal_lm(models.target)
    proxy_model, _ = load_causal_lm(models.proxy, tokenizer=False)
    examples = heldout_examples(read_heldout(models.heldout))
    pad = tok.pad_token_id
    out = {f"jsd_{name}": mean_jsd(target, DraftEnsemble.from_pretrained(path), examples[:jsd_examples], pad_id=pad)
           for name, path in (("ddd", models.drafts_ddd), ("idd", models.drafts_idd))}
    perturbation = Perturbation(target, rank=proxy.rank, sigma=proxy.sigma)
    kl = kl_to_perturbed_average([proxy_model, target], perturbation, examples[:kl_examples], pad_id=pad,
                                 members=members, seed=1)
    out["kl_proxy_to_perturbed_average"], out["kl_target_to_perturbed_average"] = kl
    out.update(perturbed_members=members, jsd_examples=min(jsd_examples, len(examples)),
               kl_examples=min(kl_examples, len(examples)))
    return out


def _models(root: Path, record: dict) -> TinyModels:
    stages = set(record["stages"])
    return TinyModels(root=root, target=root / "target", drafts_ddd=root / "drafts_ddd", drafts_idd=root / "drafts_idd",
                      proxy=root / "proxy", drafts_ddd_osd=root / "drafts_ddd_osd" if "drafts_ddd_osd" in stages else None,
                      responses=root / "target" / RESPONSES_NAME, heldout=root / "target" / HELDOUT_NAME,
                      metrics=record)
