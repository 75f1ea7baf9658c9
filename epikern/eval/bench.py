"""``epikern bench``: the paper's comparison end to end — FLOPs, latency and quality against TokUR.

    epikern bench [--quick] [--out DIR]                       # the embedded tiny default
    epikern bench --target smollm2 --dataset gsm8k --drafts DIR [--idd-drafts DIR] [--proxy DIR]
    epikern bench kernels | speculative ...                   # the kernel / decoding benchmarks

What it does, top to bottom (:func:`run`):

1. **Models.** The embedded default builds the tiny target, DDD drafts, IDD drafts and the OSD proxy
   through the training code (:func:`epikern.training.pipeline.build_tiny`, cached after the
   first run). With ``--target`` it loads the given checkpoints (``epikern.models.loading``); a
   method whose models are not given is reported as not run, with the reason.
2. **Answers.** The target answers held-out problems greedily (HF ``generate``); the grader marks
   each answer right or wrong (the number after ``####``).
3. **Scores.** Every estimator (:mod:`epikern.eval.estimators`) scores the same prompt + response
   sequences; the ground truth is TokUR's perturbation ensemble with M = 32 members (another seed).
4. **Metrics** (:mod:`epikern.eval.metrics`): token RMSE / Pearson / Spearman against the ground
   truth; hallucination AUROC of a cross-validated logistic regression on aggregated token scores;
   TokUR's protocol AUROC (negated sum); PRR; FLOPs per generated token (analytic, and measured by
   ``FlopCounterMode`` while scoring); latency per generated token (median over repeats of scoring
   one batch); peak memory of scoring.
5. **Speculative decoding** (:mod:`epikern.eval.speculative_bench`): tokens/s and acceptance with
   EU on, against plain target decoding.
6. **Report** (:mod:`epikern.eval.report`, :mod:`epikern.eval.plots`): ``report.json``,
   ``report.md`` and PNG plots in ``--out``; the table is printed last.
"""

from __future__ import annotations

from ..extras import require

require("eval", __name__)

import argparse
import dataclasses
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .results import METHODS, MethodScores, NotRun

if TYPE_CHECKING:
    from .cost import PeakMemory

__all__ = ["BenchConfig", "run", "main"]


@dataclass
class BenchConfig:
    """Settings of one ``epikern bench`` run (``None`` = the default for the dataset and ``--quick``)."""

    out: str = "runs/bench"
    quick: bool = False
    target: Optional[str] = None
    drafts: Optional[str] = None
    idd_drafts: Optional[str] = None
    proxy: Optional[str] = None
    dataset: str = "synthetic"
    problems: Optional[int] = None
    max_new_tokens: Optional[int] = None
    batch_size: Optional[int] = None
    tokur_samples: int = 10
    ground_truth_samples: int = 32
    rank: int = 8
    sigma: float = 0.1
    gammas: tuple[int, ...] = (1, 2, 4, 8)
    latency_repeats: Optional[int] = None
    device: str = "cpu"
    seed: int = 0
    models_dir: Optional[str] = None

    def __post_init__(self):
        if self.dataset not in ("synthetic", "gsm8k"):
            raise ValueError(f"dataset must be 'synthetic' or 'gsm8k', got {self.dataset!r}")
        if self.target is None and self.dataset != "synthetic":
            raise ValueError("the embedded tiny models are trained on the synthetic task: --dataset gsm8k "
                             "needs --target (e.g. --target smollm2)")
        if self.target is None and (self.drafts or self.idd_drafts or self.proxy):
            raise ValueError("--drafts/--idd-drafts/--proxy need --target: they are compared against it")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but torch sees no CUDA device")
        for name in ("problems", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.tokur_samples < 2 or self.ground_truth_samples < 2:
            raise ValueError("--tokur-samples and --ground-truth-samples must be >= 2 (clean pass + perturbed)")
        if any(g < 1 for g in self.gammas):
            raise ValueError(f"--gammas must be >= 1, got {self.gammas}")

    @property
    def real(self) -> bool:
        return self.target is not None

    def resolved(self) -> "BenchConfig":
        """The config with every ``None`` default filled in for its dataset and ``--quick``."""
        real, quick = self.real, self.quick
        defaults = {
            "problems": (4 if quick else 32) if real else (96 if quick else 200),  # quick: ~10 % right, so enough of each class
            "max_new_tokens": (48 if quick else 256) if real else 96,
            "batch_size": 4 if real else 50,
            "latency_repeats": 1 if quick else 2,
        }
        return dataclasses.replace(self, **{k: v if getattr(self, k) is None else getattr(self, k)
                                            for k, v in defaults.items()})


# --------------------------------------------------------------------------------------------
# models


class Question(NamedTuple):
    """A problem to answer: its text and the reference final answer."""

    question: str
    final: str


@dataclass
class Models:
    target: torch.nn.Module
    tokenizer: object
    ddd: Optional[object]  # DraftEnsemble
    idd: Optional[object]
    proxy: Optional[torch.nn.Module]
    problems: list  # held-out problems to answer
    info: dict  # paths, sizes, training numbers for the report
    missing: dict  # component -> why it is absent


def _models(cfg: BenchConfig) -> Models:
    from ..data import SyntheticConfig, generate_splits, load_gsm8k
    from ..models import DraftEnsemble
    from ..models.loading import load_causal_lm

    device = torch.device(cfg.device)
    info, missing = {}, {}
    from ..training.target import HELDOUT_NAME, read_heldout

    if cfg.real:
        target, tok = load_causal_lm(cfg.target, device=device)
        paths = {"target": cfg.target, "drafts": cfg.drafts, "idd_drafts": cfg.idd_drafts, "proxy": cfg.proxy}
        stored = Path(cfg.target) / HELDOUT_NAME  # a target of `epikern train target`: its own held-out problems
        heldout = [Question(r["question"], r["reference"]) for r in read_heldout(stored)] if stored.is_file() else None
    else:
        from ..training.pipeline import build_tiny

        built = build_tiny(cfg.models_dir, quick=cfg.quick)
        target, tok = load_causal_lm(built.target, device=device)
        paths = {"target": str(built.target), "drafts": str(built.drafts_ddd), "idd_drafts": str(built.drafts_idd),
                 "proxy": str(built.proxy)}
        heldout = [Question(r["question"], r["reference"]) for r in read_heldout(built.heldout)]
        info["training"] = {"root": str(built.root), **built.metrics}
    load_drafts = lambda p: DraftEnsemble.from_pretrained(p, device=device).eval()  # noqa: E731
    ddd = load_drafts(paths["drafts"]) if paths["drafts"] else None
    idd = load_drafts(paths["idd_drafts"]) if paths["idd_drafts"] else None
    proxy = load_causal_lm(paths["proxy"], device=device, tokenizer=False)[0] if paths["proxy"] else None
    for key, flag in (("drafts", "--drafts"), ("idd_drafts", "--idd-drafts"), ("proxy", "--proxy")):
        if not paths[key]:
            missing[key] = f"not run: no {flag} was given"
    if cfg.dataset == "gsm8k":
        problems, info["problem_source"] = load_gsm8k("test", limit=cfg.problems), "GSM8K test"
    elif heldout is not None:
        problems = list(heldout)[: cfg.problems]
        info["problem_source"] = str(Path(paths["target"]) / HELDOUT_NAME)
    else:
        problems = generate_splits(1, cfg.problems, SyntheticConfig(seed=cfg.seed))[1]
        info["problem_source"] = f"generated (seed {cfg.seed})"
    info["paths"] = paths
    info["models"] = {name: _describe(m) for name, m in
                      (("target", target), ("drafts", ddd), ("idd_drafts", idd), ("proxy", proxy)) if m is not None}
    return Models(target, tok, ddd, idd, proxy, problems, info, missing)


def _describe(model) -> dict:
    from ..models import DraftEnsemble

    out = {"parameters": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers,
           "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size}
    if isinstance(model, DraftEnsemble):
        out.update(num_drafts=model.num_drafts, shared_layers=model.shared_layers)
    return out


# --------------------------------------------------------------------------------------------
# answers


@dataclass
class Batch:
    """One batch of answered problems: prompt + response ids and what the grader said."""

    sequences: torch.Tensor  # [B, T0 + N]
    attention_mask: torch.Tensor  # [B, T0 + N]: prompt padding and everything after eos are 0
    prompt_len: int  # T0
    generated_mask: torch.Tensor  # [B, N]
    texts: list[str]
    wrong: list[bool]


def _answer(models: Models, cfg: BenchConfig) -> list[Batch]:
    from ..data import encode_prompts, is_correct, uses_chat_template

    tok, target = models.tokenizer, models.target
    # Chat models (SmolLM2) often end in prose ("... = 12 bolts.") instead of "#### 12": grade
    # their last number; the tiny models are trained on the "#### N" format and graded strictly.
    lenient = uses_chat_template(tok)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    batches = []
    bar = tqdm(total=len(models.problems), desc="answering", unit="problem")
    for start in range(0, len(models.problems), cfg.batch_size):
        chunk = models.problems[start: start + cfg.batch_size]
        ids, mask = encode_prompts(tok, [p.question for p in chunk], device=cfg.device)
        with torch.no_grad():
            out = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                                  do_sample=False, eos_token_id=eos, pad_token_id=pad)
        T0 = ids.shape[1]
        new = out[:, T0:]
        is_eos = new == eos
        after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first eos
        generated = ~after
        texts = [tok.decode(row[g], skip_special_tokens=True) for row, g in zip(new, generated)]
        wrong = [not is_correct(text, p.final, fallback_last_number=lenient) for text, p in zip(texts, chunk)]
        batches.append(Batch(out, torch.cat([mask, generated.long()], dim=1), T0, generated, texts, wrong))
        bar.update(len(chunk))
    bar.close()
    return batches


# --------------------------------------------------------------------------------------------
# scoring


def _estimators(models: Models, cfg: BenchConfig):
    """``(estimators, (ground_truth, its independent second half), not_run)``; not_run maps a method
    to the reason."""
    from ..models.tokur import TokUR
    from .estimators import draft_method, length_baseline, target_baselines, tokur_method
    from .oracle import oracle_method

    target = models.target
    methods, not_run = [], {}
    if models.ddd is not None:
        methods.append(draft_method("drafts_ddd", target, models.ddd))
        if models.proxy is not None:
            methods.append(draft_method("drafts_ddd_osd", target, models.ddd, models.proxy))
        else:
            not_run["drafts_ddd_osd"] = models.missing["proxy"]
    else:
        not_run["drafts_ddd"] = not_run["drafts_ddd_osd"] = models.missing["drafts"]
    if models.idd is not None:
        methods.append(draft_method("drafts_idd", target, models.idd))
        methods.append(draft_method("single_draft", target, models.idd.select([0])))
    elif models.ddd is not None:  # one draft alone needs no IDD set
        methods.append(draft_method("single_draft", target, models.ddd.select([0])))
        not_run["drafts_idd"] = models.missing["idd_drafts"]
    else:
        not_run["drafts_idd"] = not_run["single_draft"] = models.missing["idd_drafts"]
    tokur = TokUR(target, rank=cfg.rank, sigma=cfg.sigma, num_samples=cfg.tokur_samples, seed=cfg.seed)
    # the method's ceiling: as many of TokUR's perturbed members as there are DDD drafts, as drafts
    oracle_k = models.ddd.num_drafts if models.ddd is not None else 4
    methods.append(oracle_method("oracle_drafts", tokur.with_samples(oracle_k + 1, seed=cfg.seed + 2)))
    methods.append(tokur_method("tokur", tokur))
    methods += target_baselines(target) + [length_baseline(target)]
    truths = tuple(tokur_method("ground_truth", tokur.with_samples(cfg.ground_truth_samples, seed=seed))
                   for seed in (cfg.seed + 1, cfg.seed + 3))  # the second: the split-half ceiling only
    return methods, truths, not_run


@dataclass
class Scored:
    """An estimator's token scores of every response, and the cost of scoring the first batch."""

    scores: list[np.ndarray]  #: per response, its generated tokens' scores
    latency_ms_per_token: float
    measured_flops_per_token: float
    peak_memory: PeakMemory
    terms: dict[str, list[np.ndarray]] = field(default_factory=dict)  #: jsd and kl of the draft methods

    def cost(self) -> dict:
        """The measured cost as the report writes it."""
        return {"latency_ms_per_token": self.latency_ms_per_token,
                "measured_flops_per_token": self.measured_flops_per_token,
                "peak_memory_bytes": self.peak_memory.bytes, "peak_memory_method": self.peak_memory.method}


@dataclass
class MethodRun:
    """A method's scores and what its plots need besides the report entry."""

    scored: Scored
    result: MethodScores
    out_of_fold: np.ndarray  #: the detector's cross-validated P(wrong) per response


def _score_all(estimator, batches: list[Batch], cfg: BenchConfig, bar) -> Scored:
    """Scores of every response, plus the cost of scoring the first batch: latency per generated token
    (median of ``latency_repeats`` calls, the first of them the scoring call itself), peak memory of
    that call, and the FLOPs ``FlopCounterMode`` counts while scoring its first response (prompt
    included, as the estimator runs it; full attention matrices counted) per generated token."""
    from .cost import count_flops, peak_memory
    from .estimators import response_scores
    from .timing import timed_call

    first = batches[0]
    seconds, scores = [], []
    terms = {"jsd": [], "kl": []} if estimator.terms is not None else {}
    # the draft methods' terms come from the same call as their score (the whole DraftUncertainty)
    call = estimator.score if estimator.terms is None else estimator.terms

    def score(b: Batch):  # the positions from the prompt's last token on predict the response
        return call(b.sequences, b.attention_mask, b.prompt_len - 1)

    for i, b in enumerate(batches):
        if i == 0:
            (raw, mem), s = timed_call(lambda: peak_memory(lambda: score(b), device=cfg.device), cfg.device)
            seconds.append(s)
        else:
            raw = score(b)
        for name in terms:
            terms[name] += response_scores(getattr(raw, name), b.prompt_len, b.generated_mask)
        scores += response_scores(raw if not terms else raw.eu, b.prompt_len, b.generated_mask)
        bar.update(1)
    seconds += [timed_call(lambda: score(first), cfg.device)[1] for _ in range(cfg.latency_repeats - 1)]
    rows = slice(0, 1)
    _, flops, _ = count_flops(estimator.score, first.sequences[rows], first.attention_mask[rows], first.prompt_len - 1)
    generated = int(first.generated_mask.sum())
    return Scored(scores, 1e3 * float(np.median(seconds)) / generated,
                  flops / max(int(first.generated_mask[rows].sum()), 1), mem, terms)


def _scores_only(estimator, batches: list[Batch], bar) -> list[np.ndarray]:
    """The token scores of every response (no cost measured)."""
    from .estimators import response_scores

    scores = []
    for b in batches:
        scores += response_scores(estimator.score(b.sequences, b.attention_mask, b.prompt_len - 1), b.prompt_len,
                                  b.generated_mask)
        bar.update(1)
    return scores


def _split_half(truth: list[np.ndarray], second: list[np.ndarray]) -> dict:
    """The ground truth's own ceiling: Pearson and Spearman between two independent ensembles."""
    from . import metrics

    return {"split_half_pearson": metrics.pearson(second, truth), "split_half_spearman": metrics.spearman(second, truth),
            "split_half": "two independent ensembles of M members (seeds +1 and +3): the Pearson an estimator "
                          "could reach with one of them"}


def _metrics(est, scored: Scored, truth: list, wrong: np.ndarray, context: float) -> MethodRun:
    from . import metrics

    scores = scored.scores
    token = metrics.token_metrics(scores, truth)
    features, feature_names = metrics.aggregate(scores)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small-sample reasons are kept in the report
        cv = metrics.auroc_lr(features, wrong)
        prr = metrics.prr(cv.scores, wrong) if np.isfinite(cv.scores).all() else None
        auroc_tokur = metrics.auroc_tokur(scores, wrong)
        aggregates = metrics.auroc_aggregates(scores, wrong)
        calibrated = (metrics.calibrated_rmse(list(scored.terms.values()) or [scores], truth)
                      if est.is_eu else None)
    reasons = {}
    if not est.is_eu:
        reasons["rmse"] = reasons["rmse_calibrated"] = \
            "not an EU estimate (a different quantity in other units): RMSE is not meaningful"
    if prr is None:
        reasons["prr"] = cv.reason or "no cross-validated score"
    if cv.reason:
        reasons["auroc_lr"] = cv.reason
    result = MethodScores(
        description=est.description, rmse=token["rmse"] if est.is_eu else None, pearson=token["pearson"],
        spearman=token["spearman"], auroc_lr=cv.auroc, auroc_tokur=auroc_tokur, prr=prr,
        flops_per_token=est.flops_per_token(context), extra_flops_per_token=est.extra_flops_per_token(context),
        latency_ms_per_token=scored.latency_ms_per_token, measured_flops_per_token=scored.measured_flops_per_token,
        peak_memory_bytes=scored.peak_memory.bytes, peak_memory_method=scored.peak_memory.method,
        features=feature_names, reasons=reasons, rmse_calibrated=calibrated,
        **{f"auroc_{k}": v for k, v in aggregates.items()})
    return MethodRun(scored, result, cv.scores)


# --------------------------------------------------------------------------------------------
# speculative decoding


def _speculative(models: Models, batches: list[Batch], cfg: BenchConfig) -> tuple[list[dict], dict]:
    """Greedy decoding of a few held-out prompts: plain target decoding (HF ``generate`` and epikern's
    loop) against speculative decoding with the DDD drafts, EU off and on, per γ.

    Timed at one torch thread, median of 5 (1 with ``--quick``). Returns the rows (``speedup`` over
    HF ``generate``; EU rows also ``speedup_vs_plain_eu``, over plain decoding with EU, where the
    drafts run only to score) and the step costs in ms with the round times they predict
    (:func:`epikern.eval.speculative_measure.measure`'s ``steps``).
    """
    from .speculative_measure import Variant, measure

    if models.ddd is None:
        reason = models.missing["drafts"]
        return [{"name": "speculative decoding", "tokens_per_s": None, "acceptance": None,
                 "tokens_per_s_reason": reason, "acceptance_reason": reason}], {}
    b = batches[0]
    prompts = []
    for j in range(min(1 if cfg.quick else 2, b.sequences.shape[0])):
        real = b.attention_mask[j, : b.prompt_len].bool()
        prompts.append(b.sequences[j: j + 1, : b.prompt_len][:, real])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `epikern bench speculative`: dispatch-bound decoding, a 2nd thread adds noise
    try:
        result = measure(models.target, models.ddd, prompts, gammas=cfg.gammas,
                         new_tokens=min(cfg.max_new_tokens, 32 if cfg.quick else 48),
                         repeats=1 if cfg.quick else 5, assisted=False, progress=False)
    finally:
        torch.set_num_threads(threads)
    plain_eu = result.row(Variant("plain", eu=True)).tokens_per_s
    rows = []
    for r in result.rows:
        v = r.variant
        row = {"name": v.name, **r.to_json()}
        if v.eu:
            row["speedup_vs_plain_eu"] = r.tokens_per_s / plain_eu
        if v.eu and not v.confidence and v.gamma in result.eu:  # EU's share of a round is measured for these
            row.update({f"eu_{k}": x for k, x in dataclasses.asdict(result.eu[v.gamma]).items()})
        if row.get("acceptance") is None:
            row["acceptance"] = None
            row["acceptance_reason"] = "no proposals: plain decoding"
        rows.append(row)
    ms = result.steps.ms
    steps = {**{f"{k}_ms": x for k, x in ms.items()},
             "draft_step_vs_target_step": ms["draft_1"] / ms["target_1"],
             **{f"predicted_round_ms_gamma_{g}": x for g, x in result.steps.predicted_round_ms.items()}}
    return rows, steps


# --------------------------------------------------------------------------------------------
# plots


def _plots(out: Path, models: Models, batches: list[Batch], results: dict[str, MethodRun], truth: list, wrong,
           speculative: list[dict]) -> dict:
    from . import metrics, plots

    plotted = {}
    tok = models.tokenizer
    order = np.argsort([-len(s) if np.isfinite(s).all() else 0 for s in truth])  # longest clean responses
    picks = [int(i) for i in order[: 3]]
    flat = [(b, j) for b in batches for j in range(b.sequences.shape[0])]
    tokens_text, series = [], {}
    for i in picks:
        b, j = flat[i]
        ids = b.sequences[j, b.prompt_len:][b.generated_mask[j]]
        tokens_text.append([tok.decode([int(t)]) for t in ids])
    labels = {"drafts_ddd": "drafts (DDD)", "drafts_ddd_osd": "drafts (DDD) vs OSD proxy",
              "drafts_idd": "drafts (IDD)", "oracle_drafts": "oracle drafts (TokUR's members)", "tokur": "TokUR (M=10)"}
    for name, label in labels.items():
        if name in results:
            series[label] = [results[name].scored.scores[i] for i in picks]
    series["ground truth (M=32)"] = [truth[i] for i in picks]
    plotted["Per-token EU along responses"] = plots.eu_traces(out / "eu_traces.png", tokens_text, series)
    curves = {}
    for name, r in results.items():
        auroc = r.result.auroc_lr
        if np.isfinite(r.out_of_fold).all() and auroc is not None and np.isfinite(auroc):
            curves[name] = metrics.roc_points(r.out_of_fold, wrong)
    if curves:
        plotted["ROC curves (hallucination detection)"] = plots.roc_curves(out / "roc.png", curves)
    points = {name: (r.result.flops_per_token, r.result.auroc_lr) for name, r in results.items()}
    plotted["Cost vs quality"] = plots.cost_quality(out / "cost_quality.png", points)
    if any(r.get("gamma") and r.get("speedup") for r in speculative):
        plotted["Speculative decoding: speed per γ"] = plots.speculative_speedup(out / "speculative.png", speculative)
    return {title: os.path.relpath(path, out) for title, path in plotted.items()}


# --------------------------------------------------------------------------------------------
# the run


def run(cfg: BenchConfig) -> dict:
    """Run the whole comparison; write ``report.json``, ``report.md`` and the plots into ``cfg.out``."""
    from .cost import mean_decode_context
    from .machine import machine_info, versions
    from .report import methods_table, write_report

    cfg = cfg.resolved()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    stages = {}

    def lap(name: str) -> None:  # wall seconds of each stage, for the report
        stages[name] = time.perf_counter() - t0 - sum(stages.values())

    models = _models(cfg)
    lap("models")
    batches = _answer(models, cfg)
    lap("answering")
    wrong = np.array([w for b in batches for w in b.wrong], dtype=bool)
    methods, (truth_est, second_est), not_run = _estimators(models, cfg)
    bar = tqdm(total=len(batches) * (len(methods) + 2), desc="scoring", unit="batch")
    bar.set_postfix_str("ground truth")
    truth = _score_all(truth_est, batches, cfg, bar)
    lap("scoring ground_truth")
    bar.set_postfix_str("ground truth, second half")
    second = _scores_only(second_est, batches, bar)
    lap("scoring ground_truth (second half)")
    results = {}
    n_generated = [int(b.generated_mask.sum()) for b in batches]
    prompt_len = float(np.mean([int(b.attention_mask[:, : b.prompt_len].sum(1).float().mean()) for b in batches]))
    context = mean_decode_context(round(prompt_len), max(1, round(sum(n_generated) / len(wrong))))
    for est in methods:
        bar.set_postfix_str(est.name)
        scored = _score_all(est, batches, cfg, bar)
        results[est.name] = _metrics(est, scored, truth.scores, wrong, context)
        lap(f"scoring {est.name}")
    bar.close()
    speculative, speculative_steps = _speculative(models, batches, cfg)
    lap("speculative")
    plots = _plots(out, models, batches, results, truth.scores, wrong, speculative)
    lap("plots")
    tokur_flops = results["tokur"].result.flops_per_token
    method_table: dict[str, Union[MethodScores, NotRun]] = {}
    for name in METHODS:
        if name in results:
            method_table[name] = dataclasses.replace(
                results[name].result, flops_vs_tokur=results[name].result.flops_per_token / tokur_flops)
        else:
            method_table[name] = NotRun(not_run[name])
    report = {
        "machine": machine_info(),
        "versions": versions(),
        "config": {**dataclasses.asdict(cfg), **models.info},
        "dataset": {"name": cfg.dataset, "problems": int(wrong.size), "accuracy": float(1 - wrong.mean()),
                    "generated_tokens": int(sum(n_generated)), "mean_decode_context": context},
        "methods": {name: m.to_json() for name, m in method_table.items()},
        "ground_truth": {"description": truth_est.description, "num_samples": cfg.ground_truth_samples,
                         "flops_per_token": truth_est.flops_per_token(context),
                         **truth.cost(), **_split_half(truth.scores, second)},
        "speculative": speculative,
        "speculative_steps": speculative_steps,
        "plots": plots,
        "wall_s": time.perf_counter() - t0,
        "stage_seconds": stages,
    }
    counts = int(wrong.sum()), int((~wrong).sum())
    if min(counts) < 10:
        report["warnings"] = [f"only {counts[1]} correct and {counts[0]} wrong answers among {wrong.size}: the "
                              "detection metrics (AUROC, PRR) rest on very few examples of one class"
                              + (" (--quick trains a weaker target; run without --quick)" if cfg.quick else "")]
    if "training" in models.info:
        t = models.info["training"]
        report["training"] = {"target_heldout_accuracy": t["metrics"]["target"]["heldout_accuracy"],
                              **t.get("diagnostics", {}), "seconds": t.get("seconds", {}), "root": t["root"]}
    json_path, md_path = write_report(out, report)
    d = report["dataset"]
    print(f"{d['name']}: {d['problems']} problems, target accuracy {d['accuracy']:.1%}, "
          f"{d['generated_tokens']} generated tokens")
    for w in report.get("warnings", []):
        print(f"warning: {w}")
    print(methods_table(report))
    print(f"\nreport: {md_path} and {json_path} ({report['wall_s']:.0f} s)")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    parser.add_argument("--quick", action="store_true", help="fewer problems, γ and repeats (≈ 3 min on a laptop CPU)")
    parser.add_argument("--out", default=d.out, help=f"where report.md, report.json and the plots go (default {d.out})")
    parser.add_argument("--target", help="target checkpoint: HF directory, .gguf file or 'smollm2' "
                                         "(default: the embedded tiny target, trained and cached on first use)")
    parser.add_argument("--drafts", help="DDD drafts (a DraftEnsemble directory from `epikern train drafts`)")
    parser.add_argument("--idd-drafts", help="IDD drafts (`epikern train drafts --idd`)")
    parser.add_argument("--proxy", help="OSD proxy (`epikern train proxy`)")
    parser.add_argument("--dataset", choices=("synthetic", "gsm8k"), default=d.dataset)
    parser.add_argument("--problems", type=int, help="problems to answer (default 200; --quick 96; real target 32/4)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--tokur-samples", type=int, default=d.tokur_samples)
    parser.add_argument("--ground-truth-samples", type=int, default=d.ground_truth_samples)
    parser.add_argument("--gammas", type=int, nargs="+", default=list(d.gammas),
                        help="speculative tokens per round to benchmark")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--models-dir", help="cache of the embedded tiny models (default ~/.cache/epikern/tiny)")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="epikern bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["gammas"] = tuple(values["gammas"])
    try:
        cfg = BenchConfig(**values)
    except ValueError as exc:
        parser.error(str(exc))
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
