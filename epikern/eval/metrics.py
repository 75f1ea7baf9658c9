"""Quality metrics of token-level uncertainty (design §1 "Sequence level", §6 "Evaluation").

NumPy in, Python floats out. Conventions:

* Token scores come as one 1-D array per response (lengths differ) or one flat array.
* Scores are oriented as **uncertainty**: higher = less trustworthy. Pass ``−log p`` or
  ``1 − max p`` rather than the probabilities themselves.
* The positive class of every detection metric is a **wrong** answer (``wrong[i] = True``).
* Undefined values (a single class, too few tokens, constant inputs) are NaN with a
  ``UserWarning`` that says why; malformed input raises ``ValueError``.
"""

from __future__ import annotations

from ..extras import require

require("eval", __name__)

import math
import re
import warnings
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
from scipy import stats
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import GroupKFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["valid_tokens", "rmse", "pearson", "spearman", "token_metrics", "calibrated_rmse", "DEFAULT_FEATURES",
           "aggregate", "CVAUROC", "auroc_lr", "auroc_aggregates", "auroc_tokur", "prr", "rejection_curve",
           "roc_points"]

Responses = Union[np.ndarray, Sequence[np.ndarray]]


# --------------------------------------------------------------------------------------------
# token level


def _responses(name: str, x: Responses) -> list[np.ndarray]:
    """A flat array or a sequence of 1-D arrays as a list of float64 1-D arrays."""
    if isinstance(x, np.ndarray) and x.ndim == 1:
        return [x.astype(np.float64)]
    if isinstance(x, np.ndarray) and x.ndim != 1:
        raise ValueError(f"{name} must be 1-D or a list of 1-D arrays, got shape {x.shape}")
    out = []
    for i, r in enumerate(x):
        r = np.asarray(r, dtype=np.float64)
        if r.ndim != 1:
            raise ValueError(f"{name}[{i}] must be 1-D, got shape {r.shape} (pass one response as a "
                             "1-D NumPy array, several as a list of 1-D arrays)")
        out.append(r)
    return out


def _concat(pred: Responses, truth: Responses, mask: Optional[Responses]):
    """Concatenated ``(pred, truth, unmasked)`` after checking that the layouts match."""
    p, t = _responses("pred", pred), _responses("truth", truth)
    if len(p) != len(t):
        raise ValueError(f"pred has {len(p)} responses, truth has {len(t)}")
    if mask is None:
        m = [np.ones(len(r), dtype=bool) for r in p]
    else:
        m = [np.asarray(r, dtype=bool) for r in ([mask] if isinstance(mask, np.ndarray) and mask.ndim == 1 else mask)]
    if len(m) != len(p):
        raise ValueError(f"mask has {len(m)} responses, pred has {len(p)}")
    for i, (a, b, c) in enumerate(zip(p, t, m)):
        if not a.shape == b.shape == c.shape:
            raise ValueError(f"response {i}: pred {a.shape}, truth {b.shape} and mask {c.shape} differ in length")
    if not p:
        return np.empty(0), np.empty(0), np.empty(0, dtype=bool)
    return np.concatenate(p), np.concatenate(t), np.concatenate(m)


def valid_tokens(pred: Responses, truth: Responses, mask: Optional[Responses] = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the valid tokens of many responses: ``(pred_valid, truth_valid)``, 1-D float64.

    A token is valid where both values are finite and ``mask`` (same layout, True = keep) is set.
    ``pred``/``truth``/``mask`` are each a 1-D array or a sequence of 1-D arrays of matching
    lengths (response ``i`` of ``pred`` must have the length of response ``i`` of ``truth``).
    """
    a, b, unmasked = _concat(pred, truth, mask)
    keep = unmasked & np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def rmse(pred: Responses, truth: Responses, mask: Optional[Responses] = None) -> float:
    """``sqrt(mean((pred − truth)²))`` over the valid tokens (:func:`valid_tokens`); NaN if none."""
    a, b = valid_tokens(pred, truth, mask)
    if a.size == 0:
        warnings.warn("rmse: no valid (finite, unmasked) tokens; returning NaN", stacklevel=2)
        return math.nan
    return float(np.sqrt(np.mean((a - b) ** 2)))


def _correlation(kind: str, pred, truth, mask) -> float:
    a, b = valid_tokens(pred, truth, mask)
    if a.size < 2:
        warnings.warn(f"{kind}: {a.size} valid tokens, need >= 2; returning NaN", stacklevel=3)
        return math.nan
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        which = "pred" if np.ptp(a) == 0 else "truth"
        warnings.warn(f"{kind}: {which} is constant over the valid tokens, the correlation is "
                      "undefined; returning NaN", stacklevel=3)
        return math.nan
    fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
    return float(fn(a, b).statistic)


def pearson(pred: Responses, truth: Responses, mask: Optional[Responses] = None) -> float:
    """Pearson correlation (``scipy.stats.pearsonr``) over the valid tokens; NaN if < 2 or constant."""
    return _correlation("pearson", pred, truth, mask)


def spearman(pred: Responses, truth: Responses, mask: Optional[Responses] = None) -> float:
    """Spearman rank correlation (``scipy.stats.spearmanr``) over the valid tokens; NaN if < 2 or constant."""
    return _correlation("spearman", pred, truth, mask)


def token_metrics(pred: Responses, truth: Responses, mask: Optional[Responses] = None) -> dict:
    """``{"rmse", "pearson", "spearman", "n_tokens", "n_invalid"}`` in one call: ``n_tokens``
    valid tokens, ``n_invalid`` unmasked tokens left out because a value was NaN or ±inf."""
    a, b, unmasked = _concat(pred, truth, mask)
    n_valid = int((unmasked & np.isfinite(a) & np.isfinite(b)).sum())
    return {"rmse": rmse(pred, truth, mask), "pearson": pearson(pred, truth, mask),
            "spearman": spearman(pred, truth, mask), "n_tokens": n_valid,
            "n_invalid": int(unmasked.sum()) - n_valid}


def calibrated_rmse(terms: Sequence[Responses], truth: Responses, folds: int = 5) -> float:
    """RMSE to ``truth`` of the best linear map of the EU terms, cross-fitted over responses.

    ``truth_t ≈ Σ_j c_j · term_j,t`` (e.g. ``c_1·jsd + c_2·kl``: one coefficient per term, no
    intercept, so a zero estimate stays zero) is fit by least squares
    (``sklearn.linear_model.LinearRegression(fit_intercept=False)``) on the tokens of the other
    folds of ``GroupKFold(folds)`` over responses, and each token is predicted by the map that did
    not see its response. It separates the information in the terms from their scale: a term off
    by a constant factor loses nothing here. Tokens with a non-finite value are left out.

    Args:
        terms: J score sets, each as :func:`rmse`'s ``pred`` (per-response arrays or flat).
        truth: the ground truth, aligned with every term.
        folds: folds over responses (fewer if there are fewer responses; NaN below 2).
    """
    if not terms:
        raise ValueError("terms is empty: give at least one EU term (e.g. [jsd, kl])")
    truth_r = _responses("truth", truth)
    columns = [_responses(f"terms[{j}]", t) for j, t in enumerate(terms)]
    for j, col in enumerate(columns):
        if [len(r) for r in col] != [len(r) for r in truth_r]:
            raise ValueError(f"terms[{j}] and truth differ in their response lengths")
    X = np.column_stack([np.concatenate(col) if col else np.zeros(0) for col in columns])
    y = np.concatenate(truth_r) if truth_r else np.zeros(0)
    groups = np.repeat(np.arange(len(truth_r)), [len(r) for r in truth_r])
    keep = np.isfinite(X).all(axis=1) & np.isfinite(y)
    X, y, groups = X[keep], y[keep], groups[keep]
    splits = min(folds, np.unique(groups).size)
    if splits < 2:
        warnings.warn("calibrated_rmse: fewer than 2 responses with finite tokens; returning NaN", stacklevel=2)
        return math.nan
    pred = cross_val_predict(LinearRegression(fit_intercept=False), X, y, groups=groups, cv=GroupKFold(splits))
    return float(np.sqrt(np.mean((pred - y) ** 2)))


# --------------------------------------------------------------------------------------------
# sequence aggregation

_QUANTILE = re.compile(r"q(\d{1,2}(?:\.\d+)?|100)$")
DEFAULT_FEATURES = ("mean", "max", "sum", "last_k_mean", "q90")


def _feature(name: str, x: np.ndarray, last_k: int) -> float:
    if name == "mean":
        return float(np.mean(x))
    if name == "max":
        return float(np.max(x))
    if name == "min":
        return float(np.min(x))
    if name == "sum":
        return float(np.sum(x))
    if name == "std":
        return float(np.std(x))
    if name == "last":
        return float(x[-1])
    if name == "last_k_mean":
        return float(np.mean(x[-last_k:]))
    match = _QUANTILE.match(name)
    if match:
        return float(np.quantile(x, float(match.group(1)) / 100))
    raise ValueError(f"unknown feature {name!r}; known: mean, max, min, sum, std, last, "
                     "last_k_mean, q<0..100> (e.g. q90)")


def aggregate(token_scores: Responses, features: Sequence[str] = DEFAULT_FEATURES, last_k: int = 8
              ) -> tuple[np.ndarray, list[str]]:
    """Sequence features of per-token scores: ``(X [n_responses, F], names [F])``.

    Features: ``mean``, ``max``, ``min``, ``sum``, ``std``, ``last`` (final token), ``last_k_mean``
    (mean of the last ``last_k`` tokens, all of them if shorter; named ``last{k}_mean``) and
    ``qNN`` (the NN-th percentile, linear interpolation, e.g. ``q90``). Each is taken over the
    response's finite values; NaN/±inf tokens are left out with a warning, and a response with no
    finite value gives a row of NaN.
    """
    if isinstance(last_k, bool) or not isinstance(last_k, int) or last_k < 1:
        raise ValueError(f"last_k must be an int >= 1, got {last_k!r}")
    features = list(features)
    if not features:
        raise ValueError("features is empty")
    for name in features:  # fail on a bad name before any work
        _feature(name, np.zeros(1), last_k)
    rows, dropped, empty = [], 0, 0
    for r in _responses("token_scores", token_scores):
        finite = r[np.isfinite(r)]
        dropped += r.size - finite.size
        if finite.size == 0:
            empty += 1
            rows.append([math.nan] * len(features))
        else:
            rows.append([_feature(name, finite, last_k) for name in features])
    if dropped:
        warnings.warn(f"aggregate: left out {dropped} non-finite token scores", stacklevel=2)
    if empty:
        warnings.warn(f"aggregate: {empty} responses have no finite token score (rows of NaN)", stacklevel=2)
    names = [f"last{last_k}_mean" if n == "last_k_mean" else n for n in features]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(features)), names


# --------------------------------------------------------------------------------------------
# hallucination detection


def _labels(wrong, n: Optional[int] = None) -> np.ndarray:
    y = np.asarray(wrong)
    if y.ndim != 1:
        raise ValueError(f"wrong must be 1-D, got shape {y.shape}")
    if y.dtype != bool:
        if not np.all(np.isin(y, (0, 1))):
            raise ValueError("wrong must be boolean or 0/1 (True = wrong answer)")
        y = y.astype(bool)
    if n is not None and y.size != n:
        raise ValueError(f"wrong has {y.size} entries for {n} responses")
    return y


def _scores(name: str, scores, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size != n:
        raise ValueError(f"{name} must be 1-D with one score per response ({n}), got shape {s.shape}")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise ValueError(f"{name} has {bad.size} non-finite values (first at indices {bad[:5].tolist()})")
    return s


def _single_class_reason(y: np.ndarray) -> Optional[str]:
    if y.size == 0:
        return "no responses"
    if y.all():
        return f"all {y.size} answers are wrong: AUROC needs both classes"
    if not y.any():
        return f"all {y.size} answers are correct: AUROC needs both classes"
    return None


class CVAUROC(NamedTuple):
    """Result of :func:`auroc_lr`."""

    auroc: float  #: AUROC of the pooled out-of-fold probabilities (NaN with ``reason``)
    scores: np.ndarray  #: [n] out-of-fold P(wrong) (NaN where not computed), for ROC curves
    folds: int  #: folds actually used (0 when not computed)
    reason: Optional[str]  #: why ``auroc`` is NaN, or why folds were reduced; None otherwise


def auroc_lr(features: np.ndarray, wrong, folds: int = 5, seed: int = 0, C: float = 1.0) -> CVAUROC:
    """Hallucination-detection AUROC of a cross-validated logistic regression on sequence features.

    ``make_pipeline(StandardScaler(), LogisticRegression(C=C))`` is fit with
    ``StratifiedKFold(folds, shuffle=True, random_state=seed)``; ``cross_val_predict`` gives every
    response a P(wrong) from the model that did not see it, and one ``roc_auc_score`` is taken over
    all of them (out-of-fold probabilities pooled across folds).

    Args:
        features: ``[n, F]`` (or ``[n]``) finite features, e.g. from :func:`aggregate`.
        wrong: ``[n]`` booleans, True = wrong answer (the positive class).
        folds: requested folds (>= 2). If the smaller class has fewer members, folds drop to that
            count with a warning (and ``reason`` says so); with fewer than 2 of a class the result
            is NaN with the reason. It never fails on small data.
    """
    X = np.asarray(features, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2:
        raise ValueError(f"features must be [n, F], got shape {X.shape}")
    y = _labels(wrong, X.shape[0])
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if bad.size:
        raise ValueError(f"features has non-finite values in {bad.size} rows (first {bad[:5].tolist()}); "
                         "drop or impute them first")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    nan_scores = np.full(y.size, math.nan)
    reason = _single_class_reason(y)
    if reason is not None:
        warnings.warn(f"auroc_lr: {reason}; returning NaN", stacklevel=2)
        return CVAUROC(math.nan, nan_scores, 0, reason)
    minority = int(min(y.sum(), (~y).sum()))
    if minority < 2:
        reason = (f"only {minority} {'wrong' if y.sum() < 2 else 'correct'} answer among {y.size}: "
                  "cross-validation needs >= 2 of each class")
        warnings.warn(f"auroc_lr: {reason}; returning NaN", stacklevel=2)
        return CVAUROC(math.nan, nan_scores, 0, reason)
    used = min(folds, minority)
    if used < folds:
        reason = f"folds reduced from {folds} to {used}: the smaller class has {minority} members"
        warnings.warn(f"auroc_lr: {reason}", stacklevel=2)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))
    cv = StratifiedKFold(n_splits=used, shuffle=True, random_state=seed)
    oof = cross_val_predict(model, X, y, cv=cv, method="predict_proba")[:, 1]
    return CVAUROC(float(roc_auc_score(y, oof)), oof, used, reason)


def auroc_aggregates(token_scores: Responses, wrong, aggregates: Sequence[str] = ("mean", "max", "sum")
                     ) -> dict[str, float]:
    """AUROC of detecting wrong answers by each aggregate of the token scores alone (no fitting):
    ``{"mean": ..., "max": ..., "sum": ...}`` (the names of :func:`aggregate`). NaN (with a warning)
    for one class, or for an aggregate that is not finite for every response."""
    X, names = aggregate(token_scores, aggregates)
    y = _labels(wrong, X.shape[0])
    reason = _single_class_reason(y)
    out = {}
    for name, column in zip(names, X.T):
        if reason is not None or not np.isfinite(column).all():
            warnings.warn(f"auroc_aggregates: {reason or f'{name} is not finite for every response'}; NaN",
                          stacklevel=2)
            out[name] = math.nan
        else:
            out[name] = float(roc_auc_score(y, column))
    return out


def auroc_tokur(token_scores: Responses, wrong) -> float:
    """AUROC with TokUR's protocol: confidence ``= −Σ_t EU_t`` over each response's generated
    tokens, scored for detecting **correct** answers (equal to the AUROC of ``Σ_t EU_t`` for wrong
    answers). Non-finite token values fail (``ValueError``); NaN (with a warning) for one class."""
    sums = np.array([np.sum(r) for r in _responses("token_scores", token_scores)])
    y = _labels(wrong, sums.size)
    confidence = -_scores("summed token_scores", sums, y.size)
    reason = _single_class_reason(y)
    if reason is not None:
        warnings.warn(f"auroc_tokur: {reason}; returning NaN", stacklevel=2)
        return math.nan
    return float(roc_auc_score(~y, confidence))


def rejection_curve(scores, wrong) -> np.ndarray:
    """Errors left after rejecting the ``i`` most uncertain responses, ``i = 0..n``, divided by n.

    Responses are rejected in decreasing ``scores``; within a group of tied scores the rejected
    ones are a uniformly random subset, so the curve holds the expected count (it is linear across
    the group). ``E(0) = (#wrong)/n``, ``E(n) = 0``.
    """
    y = _labels(wrong)
    s = _scores("scores", scores, y.size)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    # boundaries of groups of tied scores, and the wrong answers removed at each boundary
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    bounds = np.r_[starts, y.size]
    removed = np.r_[0, np.cumsum(np.add.reduceat(y.astype(np.float64), starts))] if y.size else np.zeros(1)
    i = np.arange(y.size + 1)
    return (y.sum() - np.interp(i, bounds, removed)) / max(y.size, 1)


def prr(scores, wrong) -> float:
    """Prediction rejection ratio (Malinin et al.), with the 0/1 loss of wrong answers.

    With ``E_s = rejection_curve(scores)`` on the grid ``i = 0..n`` of rejected responses (rejected
    ones count as handled, i.e. no error), ``E_rand(i) = e·(n − i)/n`` (``e`` = error rate, the
    expectation under random rejection) and ``E_orc(i) = max(#wrong − i, 0)/n`` (rejecting exactly
    the wrong answers first)::

        PRR = Σ_i (E_rand − E_s) / Σ_i (E_rand − E_orc)

    (the ratio of areas between the curves; the trapezoidal rule gives the same ratio since all
    curves share their end points). 1 for oracle scores, 0 for constant scores (and in expectation
    for random ones), −1 for the reversed oracle. NaN (with a warning) when every answer is correct
    or every answer is wrong (the oracle is then no better than random).
    """
    y = _labels(wrong)
    curve = rejection_curve(scores, y)
    reason = _single_class_reason(y)
    if reason is not None:
        warnings.warn(f"prr: {reason.replace('AUROC', 'PRR')}; returning NaN", stacklevel=2)
        return math.nan
    n, w = y.size, int(y.sum())
    i = np.arange(n + 1)
    random = w * (n - i) / n / n
    oracle = np.maximum(w - i, 0) / n
    return float(np.sum(random - curve) / np.sum(random - oracle))


def roc_points(scores, wrong) -> tuple[np.ndarray, np.ndarray, float]:
    """``(fpr, tpr, auroc)`` for detecting wrong answers by ``scores`` (``sklearn.metrics.roc_curve``
    and ``roc_auc_score``), the input of :func:`epikern.eval.plots.roc_curves`. Raises ValueError
    for a single class (no curve exists)."""
    y = _labels(wrong)
    s = _scores("scores", scores, y.size)
    reason = _single_class_reason(y)
    if reason is not None:
        raise ValueError(f"roc_points: {reason}")
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr, float(roc_auc_score(y, s))
