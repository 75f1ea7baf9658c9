"""``epikern bench sweep``: where the draft EU means EU — capacity × diversity × the drafts beyond the paper.

    epikern bench sweep [--quick] [--out runs/sweep] [--points NAME ...]

Every point is a drafts recipe (:class:`~epikern.training.config.DraftsRecipe`): the paper's
(:func:`epikern.training.presets.drafts`) with the point's changes, on the embedded tiny target
(``build_tiny`` of the paper's pipeline; ``--quick`` the quick one), trained by the same loop as ``epikern train
drafts`` and scored on the target's own held-out answers (``heldout.jsonl``: its greedy responses,
graded), against the ground truth (TokUR's perturbation ensemble, M = 32, its own seed):

    capacity    branch layers n = 1 … L − 1 at S = 1; trunk S ∈ {0, 2, 4}; DDD 2×2, 400 steps
    steps       80 … 1600 distillation steps (S = 1, n = 1, DDD 2×2)
    diversity   K ∈ {1, 2, 4, 6, 9} and a×b ∈ {1×4 IDD, 2×2, 4×1, 2×3, 3×3}
    variants    layer-skip drafts, posterior-sample distillation (PSD), more responses per prompt
    sigma       the ground truth's σ ∈ {0.05, 0.1, 0.2} (TokUR, the oracle and PSD at the same σ)

Per point: RMSE, Pearson, Spearman, AUROC (cross-validated logistic regression, and TokUR's
protocol), PRR, FLOPs per token ÷ TokUR's, the draft step's FLOPs ÷ the target step's (what
speculative decoding pays), and the token means of jsd and kl. The references (TokUR M = 10, the
target's entropy, the oracle drafts with K = 4) are scored once per σ, and the oracle drafts
again for K ∈ {1, 2, 4, 6, 9, 16} at σ = 0.1 (``oracle_by_k``): what K perturbed members of the
ground truth's own family reach — the ceiling of any K drafts, whatever their training.

**Caching.** Drafts go to ``<tiny build>/sweep/drafts-<key>`` with ``key`` a hash of the whole
recipe (the pipeline's own DDD and IDD drafts are re-used where the recipe is theirs), and the
token scores of every point and of the references to ``scores-<key>.npz`` beside them (``key``
also hashing the evaluation settings), so a second run trains and scores nothing; the metrics are
recomputed from the cached scores. Outputs in ``--out``: ``sweep.json``,
``sweep.md`` and the plots (:mod:`epikern.eval.sweep_plots`).
"""

from __future__ import annotations

from ..extras import require

require("eval", __name__)

import argparse
import dataclasses
import hashlib
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_open, write_atomic

__all__ = ["SweepPoint", "SweepConfig", "grid", "run", "main"]


@dataclass(frozen=True)
class SweepPoint:
    """One point: ``drafts`` overrides the drafts preset (``steps`` sets ``train.steps``); ``sigma`` is
    the ground truth's σ (and TokUR's, the oracle's and a PSD teacher's). ``drafts=None`` scores only
    the references at that σ."""

    name: str
    group: str
    drafts: Optional[dict] = field(default_factory=dict)
    sigma: float = 0.1


def grid(num_layers: int, quick: bool = False) -> list[SweepPoint]:
    """The sweep's points for a target of ``num_layers`` layers (see the module docstring)."""
    P = SweepPoint
    if quick:
        return [P("base", "capacity", {}), P("S1 n2", "capacity", {"branch_layers": 2}),
                P("K=1", "diversity", {"partitions": 1, "drafts_per_partition": 1}),
                P("1x4 IDD", "diversity", {"partitions": 1, "drafts_per_partition": 4, "idd": True}),
                P("PSD 1x4", "variants", {"partitions": 1, "drafts_per_partition": 4, "idd": True, "psd": True}),
                P("layer-skip S1 n1", "variants", {"layer_skip": True}),
                P("sigma 0.2", "sigma", None, 0.2)]
    long = {"steps": 400}
    points = [P("default (80 steps)", "steps", {})]
    points += [P(f"{s} steps", "steps", {"steps": s}) for s in (200, 400, 800, 1600)]
    points += [P(f"S1 n{n}", "capacity", {"branch_layers": n, **long}) for n in range(2, num_layers)]
    points += [P(f"S{s} n1", "capacity", {"shared_layers": s, **long}) for s in (0, 2, 4) if s + 1 <= num_layers]
    if num_layers >= 6:
        points.append(P("S4 n2", "capacity", {"shared_layers": 4, "branch_layers": 2, **long}))
    for a, b, idd in ((1, 1, False), (2, 1, False), (1, 4, True), (4, 1, False), (2, 3, False), (3, 3, False)):
        points.append(P(f"{a}x{b}" + (" IDD" if idd else ""), "diversity",
                        {"partitions": a, "drafts_per_partition": b, "idd": idd, **long}))
    points += [P("layer-skip S1 n1", "variants", {"layer_skip": True, **long}),
               P("layer-skip S2 n2", "variants", {"layer_skip": True, "shared_layers": 2, "branch_layers": 2, **long}),
               P("PSD 1x4", "variants", {"partitions": 1, "drafts_per_partition": 4, "idd": True, "psd": True, **long}),
               P("PSD 2x2", "variants", {"psd": True, **long}),
               P("PSD 2x2, 200 steps", "variants", {"psd": True, "steps": 200}),
               P("PSD 1x4, 800 steps", "variants",
                 {"partitions": 1, "drafts_per_partition": 4, "idd": True, "psd": True, "steps": 800}),
               P("more responses (R=8) 2x2", "variants", {"more_responses": 4, **long})]
    # a wider teacher than the ground truth: the drafts' spread above their capacity noise (scored at σ = 0.1)
    for teacher in (0.2, 0.3, 0.4):
        points += [P(f"PSD 1x4, teacher sigma {teacher}", "variants",
                     {"partitions": 1, "drafts_per_partition": 4, "idd": True, "psd": True, "sigma": teacher, **long}),
                   P(f"PSD 2x2, teacher sigma {teacher}", "variants", {"psd": True, "sigma": teacher, **long})]
    for sigma in (0.05, 0.2):
        points += [P(f"400 steps, sigma {sigma}", "sigma", long, sigma),
                   P(f"PSD 1x4, sigma {sigma}", "sigma",
                     {"partitions": 1, "drafts_per_partition": 4, "idd": True, "psd": True, **long}, sigma)]
    return points


@dataclass(frozen=True)
class SweepConfig:
    """Settings of one ``epikern bench sweep`` run (``None``: the default for ``--quick``)."""

    out: str = "runs/sweep"
    quick: bool = False
    problems: Optional[int] = None
    points: Optional[tuple[str, ...]] = None  #: names of the points to run (default: all)
    models_dir: Optional[str] = None
    tokur_samples: int = 10
    ground_truth_samples: int = 32
    oracle_drafts: int = 4
    oracle_k: tuple[int, ...] = (1, 2, 4, 6, 9, 16)  #: K of the oracle-by-K curve (σ = 0.1)
    rank: int = 8
    batch_size: int = 50
    seed: int = 0
    pipeline: Optional[object] = None  #: explicit tiny-pipeline recipes (``TinyPipeline``; e.g. smaller ones in tests)

    def problems_or_default(self) -> int:
        return self.problems or (96 if self.quick else 200)


def _key(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def drafts_recipe(point: SweepPoint, base):
    """The point's :class:`DraftsRecipe`: ``base`` (target set) with the point's overrides."""
    changes = dict(point.drafts)
    steps = changes.pop("steps", None)
    if steps is not None:
        changes["train"] = dataclasses.replace(base.train, steps=steps, warmup_steps=min(base.train.warmup_steps, steps))
    if changes.get("psd"):
        changes.setdefault("sigma", point.sigma)  # the teacher's σ: the ground truth's unless the point sets it
    return dataclasses.replace(base, **changes)


# --------------------------------------------------------------------------------------------
# the evaluation set: the target's held-out problems with its own greedy answers


@dataclass
class EvalBatch:
    """Left-padded prompts then right-padded responses: ``sequences``/``attention_mask [B, T0 + N]``,
    ``generated_mask [B, N]``."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    generated_mask: torch.Tensor


@dataclass
class EvalSet:
    batches: list[EvalBatch]
    wrong: np.ndarray  #: [n] bool
    context: float  #: mean decode context (for the analytic FLOPs)


def evaluation_set(rows: Sequence[dict], pad_id: int, batch_size: int) -> EvalSet:
    """Batches of ``heldout.jsonl`` rows (prompt ids, the target's greedy response ids, graded)."""
    from .cost import mean_decode_context

    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        T0, N = max(len(r["prompt_ids"]) for r in chunk), max(max(len(r["response_ids"]) for r in chunk), 1)
        ids = torch.full((len(chunk), T0 + N), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(chunk):
            p, a = r["prompt_ids"], r["response_ids"]
            ids[b, T0 - len(p):T0 + len(a)] = torch.tensor(p + a)
            mask[b, T0 - len(p):T0 + len(a)] = 1
        batches.append(EvalBatch(ids, mask, T0, mask[:, T0:].bool()))
    prompt = float(np.mean([len(r["prompt_ids"]) for r in rows]))
    answer = float(np.mean([len(r["response_ids"]) for r in rows]))
    return EvalSet(batches, np.array([not r["correct"] for r in rows]), mean_decode_context(round(prompt),
                                                                                            max(1, round(answer))))


def score(fn: Callable, data: EvalSet, fields: Sequence[str] = ()) -> dict[str, list[np.ndarray]]:
    """Per-response token scores of ``fn(sequences, attention_mask, start)``: ``{"score": [...]}`` for
    a ``[B, T]`` result, or the named ``fields`` of a NamedTuple of ``[B, T]`` tensors."""
    from .estimators import response_scores

    out = {name: [] for name in fields or ("score",)}
    for b in data.batches:
        raw = fn(b.sequences, b.attention_mask, b.prompt_len - 1)
        for name in out:
            out[name] += response_scores(getattr(raw, name) if fields else raw, b.prompt_len, b.generated_mask)
    return out


def quality(scores: list[np.ndarray], truth: list[np.ndarray], wrong: np.ndarray, is_eu: bool,
            terms: Optional[Sequence[list[np.ndarray]]] = None,
            entropy: Optional[list[np.ndarray]] = None) -> dict:
    """Against ``truth``: RMSE and the calibrated RMSE of ``terms`` (default: the score itself; EU
    estimates only), Pearson, Spearman. Detecting wrong answers: AUROC of the cross-validated
    logistic regression, of the mean, max and sum alone, and of TokUR's protocol; PRR; and, given
    the target's ``entropy`` token scores, ``auroc_lr_with_entropy``: the regression on both scores'
    features — what the score adds to what the target's own entropy (free beside it) knows."""
    from . import metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # NaN where undefined (e.g. a constant score's correlation)
        token = metrics.token_metrics(scores, truth)
        X = metrics.aggregate(scores)[0]
        cv = metrics.auroc_lr(X, wrong)
        both = None if entropy is None else metrics.auroc_lr(np.hstack([X, metrics.aggregate(entropy)[0]]), wrong).auroc
        return {"rmse": token["rmse"] if is_eu else None,
                "rmse_calibrated": metrics.calibrated_rmse(terms or [scores], truth) if is_eu else None,
                "pearson": token["pearson"], "spearman": token["spearman"], "auroc_lr": cv.auroc,
                **{f"auroc_{k}": v for k, v in metrics.auroc_aggregates(scores, wrong).items()},
                "auroc_tokur": metrics.auroc_tokur(scores, wrong),
                "prr": metrics.prr(cv.scores, wrong) if np.isfinite(cv.scores).all() else None,
                "auroc_lr_with_entropy": both}


def cached_scores(path: Path, compute: Callable[[], dict[str, list[np.ndarray]]]
                  ) -> tuple[dict[str, list[np.ndarray]], bool]:
    """Named per-response token scores from ``path`` (``.npz``: values and lengths per name), or
    ``compute()``'s written there atomically; and whether they were computed."""
    if path.is_file():
        with np.load(path) as z:
            names = [k[:-len("_values")] for k in z.files if k.endswith("_values")]
            return {n: np.split(z[f"{n}_values"], np.cumsum(z[f"{n}_lengths"])[:-1]) for n in names}, False
    scores = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, values in scores.items():
        arrays[f"{name}_values"] = np.concatenate(values) if values else np.zeros(0)
        arrays[f"{name}_lengths"] = np.array([len(v) for v in values], dtype=np.int64)
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return scores, True


class Sweep:
    """The target, its evaluation set and the caches: the token scores of every point and of the
    references of each σ are computed once (``scores-<key>.npz``); the metrics are recomputed from
    them on every run (cheap), so a new metric applies to every cached point."""

    def __init__(self, cfg: SweepConfig):
        from ..models.loading import load_causal_lm
        from ..training.config import to_dict
        from ..training.pipeline import build_tiny, tiny_pipeline
        from ..training.target import read_heldout

        self.cfg = cfg
        # the paper's recipes: the grid varies them, whatever the embedded default is
        pipeline = cfg.pipeline or tiny_pipeline(cfg.quick, paper=True)
        self.built = build_tiny(cfg.models_dir, quick=cfg.quick, pipeline=pipeline,
                                label=None if cfg.pipeline else "quick" if cfg.quick else "default")
        self.cache = self.built.root / "sweep"
        self.target, tok = load_causal_lm(self.built.target)
        rows = read_heldout(self.built.heldout)[:cfg.problems_or_default()]
        self.data = evaluation_set(rows, tok.pad_token_id, cfg.batch_size)
        self.base = dataclasses.replace(pipeline.ddd, target=str(self.built.target))
        self.settings = {"problems": len(rows), "seed": cfg.seed, "ground_truth_samples": cfg.ground_truth_samples,
                         "tokur_samples": cfg.tokur_samples, "oracle_drafts": cfg.oracle_drafts, "rank": cfg.rank}
        self.known = {_key(to_dict(dataclasses.replace(pipeline.ddd, target=str(self.built.target)))):
                      self.built.drafts_ddd,
                      _key(to_dict(dataclasses.replace(pipeline.idd, target=str(self.built.target)))):
                      self.built.drafts_idd}
        self.trained, self.scored, self._perturbations = [], [], {}

    def _scores(self, what: str, key: dict, compute: Callable[[], dict]) -> dict[str, list[np.ndarray]]:
        scores, computed = cached_scores(self.cache / f"scores-{_key({**self.settings, **key})}.npz", compute)
        if computed:
            self.scored.append(what)
        return scores

    # -- references -------------------------------------------------------------------------

    def _methods(self, sigma: float) -> dict:
        """TokUR, the entropy, the oracle drafts, the ground truth and its independent second half."""
        from .estimators import target_baselines, tokur_method
        from .oracle import oracle_method

        cfg = self.cfg
        entropy = next(m for m in target_baselines(self.target) if m.name == "entropy")
        return {"tokur": tokur_method("tokur", self._members(sigma, cfg.tokur_samples, cfg.seed)), "entropy": entropy,
                "oracle_drafts": oracle_method("oracle_drafts",
                                               self._members(sigma, cfg.oracle_drafts + 1, cfg.seed + 2)),
                "ground_truth": tokur_method("ground_truth",
                                             self._members(sigma, cfg.ground_truth_samples, cfg.seed + 1)),
                "ground_truth_2": tokur_method("ground_truth_2",
                                               self._members(sigma, cfg.ground_truth_samples, cfg.seed + 3))}

    def _members(self, sigma: float, num_samples: int, seed: int):
        """TokUR's ensemble of ``num_samples`` members at ``sigma`` (one SVD per σ, shared)."""
        from ..models.perturb import Perturbation
        from ..models.tokur import TokUR

        if sigma not in self._perturbations:
            self._perturbations[sigma] = Perturbation(self.target, self.cfg.rank, sigma)
        return TokUR(self.target, None, None, num_samples, seed=seed, perturbation=self._perturbations[sigma])

    def reference_scores(self, sigma: float) -> tuple[dict, dict]:
        """``(methods, token scores)`` of the references at ``sigma``."""
        methods = self._methods(sigma)
        scores = self._scores(f"references sigma {sigma}", {"references": sigma},
                              lambda: {n: score(m.score, self.data)["score"] for n, m in methods.items()})
        return methods, scores

    def references(self, sigma: float) -> dict:
        """Metrics of TokUR, the entropy and the oracle drafts at ``sigma``, and the ground truth's
        split-half Pearson (two independent ensembles of M members)."""
        from . import metrics

        from .estimators import length_baseline

        methods, scores = self.reference_scores(sigma)
        length = length_baseline(self.target)  # no model run: scored here, not cached
        methods, scores = {**methods, "length": length}, {**scores, "length": score(length.score, self.data)["score"]}
        terms = self._scores(f"oracle terms sigma {sigma}", {"oracle_terms": sigma},
                             lambda: score(methods["oracle_drafts"].terms, self.data, ("eu", "jsd", "kl")))
        truth, c = scores["ground_truth"], self.data.context
        tokur_flops = methods["tokur"].flops_per_token(c)
        out = {name: {**quality(scores[name], truth, self.data.wrong, methods[name].is_eu,
                                [terms["jsd"], terms["kl"]] if name == "oracle_drafts" else None,
                                None if name == "entropy" else scores["entropy"]),
                      "flops_per_token": methods[name].flops_per_token(c),
                      "flops_vs_tokur": methods[name].flops_per_token(c) / tokur_flops,
                      "description": methods[name].description}
               for name in ("tokur", "entropy", "length", "oracle_drafts")}
        out["oracle_drafts"].update(jsd_mean=float(np.nanmean(np.concatenate(terms["jsd"]))),
                                    kl_mean=float(np.nanmean(np.concatenate(terms["kl"]))))
        out["oracle_jsd"] = {**quality(terms["jsd"], truth, self.data.wrong, True),
                             "flops_vs_tokur": out["oracle_drafts"]["flops_vs_tokur"],
                             "description": "jsd alone of the oracle drafts: the mutual information of K perturbed "
                                            "members (no clean member)"}
        half = scores["ground_truth_2"]
        out["ground_truth"] = {"split_half_pearson": metrics.pearson(half, truth),
                               "split_half_spearman": metrics.spearman(half, truth),
                               "mean": float(np.mean(np.concatenate(truth))),
                               "flops_vs_tokur": methods["ground_truth"].flops_per_token(c) / tokur_flops}
        return out

    def oracle_by_k(self, sigma: float) -> dict:
        """The oracle drafts' metrics for each K of ``cfg.oracle_k`` (its eu, and its jsd alone), K
        members of a seed of their own: how far K posterior samples can track the ground truth."""
        from . import metrics
        from .oracle import oracle_method

        refs, c = self.reference_scores(sigma)[1], self.data.context
        tokur_flops = self._methods(sigma)["tokur"].flops_per_token(c)
        out = {}
        for k in self.cfg.oracle_k:
            method = oracle_method(f"oracle K={k}", self._members(sigma, k + 1, self.cfg.seed + 2))
            terms = self._scores(f"oracle K={k} sigma {sigma}", {"oracle_k": k, "sigma": sigma},
                                 lambda: score(method.terms, self.data, ("eu", "jsd", "kl")))
            # one member has no variance term: its jsd is 0 up to round-off, whose correlation means nothing
            jsd = metrics.token_metrics(terms["jsd"], refs["ground_truth"]) if k > 1 else dict.fromkeys(
                ("rmse", "pearson", "spearman"))
            out[str(k)] = {**quality(terms["eu"], refs["ground_truth"], self.data.wrong, True,
                                     [terms["jsd"], terms["kl"]], refs["entropy"]),
                           "jsd_rmse": jsd["rmse"], "jsd_pearson": jsd["pearson"], "jsd_spearman": jsd["spearman"],
                           "num_drafts": k, "flops_vs_tokur": method.flops_per_token(c) / tokur_flops}
        return out

    # -- points -----------------------------------------------------------------------------

    def drafts(self, point: SweepPoint) -> tuple[Path, dict]:
        """The point's trained drafts (trained now unless cached) and its recipe dict."""
        from ..training.config import to_dict
        from ..training.drafts import DRAFTS_NAME, train_drafts
        from ..training.outputs import RECIPE_NAME

        recipe = drafts_recipe(point, self.base)
        key = _key(to_dict(recipe))
        out = self.known.get(key, self.cache / f"drafts-{key}")
        if not (out / DRAFTS_NAME).is_file():
            train_drafts(recipe, out, resume=(out / RECIPE_NAME).is_file(), progress=True)
            self.trained.append(point.name)
        return out, to_dict(recipe)

    def evaluate(self, point: SweepPoint) -> dict:
        """The point's metrics against the ground truth at its σ; a references-only point gives ``{}``."""
        from ..models import DraftEnsemble
        from . import metrics
        from .cost import draft_ensemble_flops_per_token, lm_flops_per_token
        from .estimators import draft_method

        if point.drafts is None:
            return {}
        path, recipe = self.drafts(point)
        drafts = DraftEnsemble.from_pretrained(path).eval()
        method = draft_method("drafts", self.target, drafts)
        scores = self._scores(point.name, {"recipe": recipe}, lambda: score(method.terms, self.data, ("eu", "jsd", "kl")))
        methods, refs = self.reference_scores(point.sigma)
        c = self.data.context
        flops = method.flops_per_token(c)
        summary = json.loads((path / "drafts.json").read_text())
        return {**quality(scores["eu"], refs["ground_truth"], self.data.wrong, True, [scores["jsd"], scores["kl"]],
                          refs["entropy"]),
                **{f"jsd_{k}": v for k, v in metrics.token_metrics(scores["jsd"], refs["ground_truth"]).items()
                   if k in ("rmse", "pearson", "spearman")},  # jsd alone: PSD's estimate of the MI
                "jsd_mean": float(np.nanmean(np.concatenate(scores["jsd"]))),
                "kl_mean": float(np.nanmean(np.concatenate(scores["kl"]))),
                "flops_per_token": flops, "flops_vs_tokur": flops / methods["tokur"].flops_per_token(c),
                "draft_step_vs_target_step": draft_ensemble_flops_per_token(drafts, c)
                / lm_flops_per_token(self.target, c),
                "num_drafts": drafts.num_drafts, "shared_layers": drafts.shared_layers, "layers": drafts.num_layers,
                "training_seconds": summary.get("seconds"),
                "final_loss": float(np.mean([d["final_loss"] for d in summary["drafts"]])),
                "drafts": str(path), "recipe": recipe}


def selected_points(cfg: SweepConfig) -> list[SweepPoint]:
    """The grid of ``cfg``'s target, or the points ``cfg.points`` names (in grid order).

    Raises:
        ValueError: a name that is not a point of the grid.
    """
    from ..training.pipeline import tiny_pipeline

    points = grid((cfg.pipeline or tiny_pipeline(cfg.quick, paper=True)).target.model.num_layers, cfg.quick)
    if cfg.points:
        unknown = sorted(set(cfg.points) - {p.name for p in points})
        if unknown:
            raise ValueError(f"unknown sweep points {unknown}; known: {[p.name for p in points]}")
        points = [p for p in points if p.name in cfg.points]
    return points


def run(cfg: SweepConfig) -> dict:
    """Train (or find) and score every point; write ``sweep.json``, ``sweep.md`` and the plots."""
    from .machine import machine_info, versions
    from .report import to_json_compatible
    from .sweep_plots import plot_sweep
    from .sweep_report import format_sweep

    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    points = selected_points(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models gain nothing from a 2nd thread; on a busy host it stalls
    try:
        sweep = Sweep(cfg)
        rows = []
        for point in tqdm(points, desc="sweep", unit="point"):
            start = time.perf_counter()
            rows.append({"name": point.name, "group": point.group, "sigma": point.sigma, **sweep.evaluate(point),
                         "seconds": time.perf_counter() - start})
        sigmas = sorted({p.sigma for p in points} | {0.1})
        references = {str(s): sweep.references(s) for s in sigmas}
        oracle_by_k = sweep.oracle_by_k(0.1)
    finally:
        torch.set_num_threads(threads)
    result = to_json_compatible({
        "machine": machine_info(), "versions": versions(),
        "config": {**dataclasses.asdict(dataclasses.replace(cfg, pipeline=None)),
                   "pipeline": sweep.built.root.name},
        "target": {"root": str(sweep.built.root), "layers": sweep.target.config.num_hidden_layers,
                   "heldout_accuracy": float(1 - sweep.data.wrong.mean())},
        "evaluation": {**sweep.settings, "mean_decode_context": sweep.data.context},
        "references": references, "oracle_by_k": oracle_by_k, "points": rows,
        "trained": sweep.trained, "scored": sweep.scored,
        "wall_s": time.perf_counter() - t0})
    result["plots"] = plot_sweep(out, result)
    write_atomic(out / "sweep.json", json.dumps(result, indent=1, sort_keys=True))
    write_atomic(out / "sweep.md", format_sweep(result))
    print(format_sweep(result))
    print(f"\nsweep: {out / 'sweep.md'} and {out / 'sweep.json'} ({result['wall_s']:.0f} s; "
          f"trained {len(sweep.trained)}, scored {len(sweep.scored)})")
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="epikern bench sweep", description=__doc__.split("\n\n")[0])
    d = SweepConfig()
    parser.add_argument("--quick", action="store_true", help="the quick target and a handful of points")
    parser.add_argument("--out", default=d.out, help=f"where sweep.json, sweep.md and the plots go (default {d.out})")
    parser.add_argument("--points", nargs="+", help="run only these points (names as in --list)")
    parser.add_argument("--list", action="store_true", help="print the points' names and exit")
    parser.add_argument("--problems", type=int, help="held-out problems scored (default 200; --quick 96)")
    parser.add_argument("--models-dir", help="cache of the embedded tiny models (default ~/.cache/epikern/tiny)")
    parser.add_argument("--seed", type=int, default=d.seed)
    args = parser.parse_args(argv)
    cfg = SweepConfig(out=args.out, quick=args.quick, problems=args.problems,
                      points=tuple(args.points) if args.points else None, models_dir=args.models_dir, seed=args.seed)
    try:
        points = selected_points(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    if args.list:
        for p in points:
            print(f"{p.group:10s} {p.name}")
        return 0
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
