"""The aggregation AUROCs (mean, max, sum alone) and the cross-fitted calibrated RMSE, against
scikit-learn computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold

from epikern.eval import metrics


def _responses(rng, n=40):
    lengths = rng.integers(3, 12, size=n)
    jsd = [rng.gamma(1.0, 0.1, size=k) for k in lengths]
    kl = [rng.gamma(2.0, 0.5, size=k) for k in lengths]
    return jsd, kl


def test_a_truth_linear_in_the_terms_is_recovered_exactly():
    jsd, kl = _responses(np.random.default_rng(0))
    truth = [2.0 * a + 0.25 * b for a, b in zip(jsd, kl)]
    assert metrics.calibrated_rmse([jsd, kl], truth) < 1e-12
    assert metrics.rmse([a + b for a, b in zip(jsd, kl)], truth) > 0.1  # the raw sum is off in scale


def test_calibrated_rmse_matches_group_cross_fitting_by_hand():
    rng = np.random.default_rng(1)
    jsd, kl = _responses(rng)
    truth = [0.5 * a + 0.1 * b + rng.normal(0, 0.05, size=a.size) for a, b in zip(jsd, kl)]
    truth[3][1] = math.nan  # left out, with its terms
    X = np.column_stack([np.concatenate(jsd), np.concatenate(kl)])
    y = np.concatenate(truth)
    groups = np.repeat(np.arange(len(jsd)), [a.size for a in jsd])
    keep = np.isfinite(y)
    X, y, groups = X[keep], y[keep], groups[keep]
    pred = np.empty_like(y)
    for train, test in GroupKFold(5).split(X, y, groups):
        pred[test] = LinearRegression(fit_intercept=False).fit(X[train], y[train]).predict(X[test])
    want = float(np.sqrt(np.mean((pred - y) ** 2)))
    assert metrics.calibrated_rmse([jsd, kl], truth) == pytest.approx(want, rel=1e-12)
    one = metrics.calibrated_rmse([[a + b for a, b in zip(jsd, kl)]], truth)
    assert one >= want * 0.99  # one coefficient for the sum can do no better than two


def test_calibrated_rmse_refuses_misaligned_terms_and_needs_two_responses():
    jsd, kl = _responses(np.random.default_rng(2), n=4)
    with pytest.raises(ValueError, match="response lengths"):
        metrics.calibrated_rmse([jsd, kl[:-1] + [kl[-1][:-1]]], jsd)
    with pytest.raises(ValueError, match="at least one"):
        metrics.calibrated_rmse([], jsd)
    with pytest.warns(UserWarning, match="fewer than 2"):
        assert math.isnan(metrics.calibrated_rmse([jsd[:1]], kl[:1]))


def test_auroc_aggregates_are_sklearn_aurocs_of_each_aggregate():
    rng = np.random.default_rng(3)
    scores, _ = _responses(rng)
    wrong = rng.random(len(scores)) < 0.4
    got = metrics.auroc_aggregates(scores, wrong)
    assert set(got) == {"mean", "max", "sum"}
    for name, fn in (("mean", np.mean), ("max", np.max), ("sum", np.sum)):
        assert got[name] == pytest.approx(roc_auc_score(wrong, [fn(s) for s in scores]), abs=1e-15)
    with pytest.warns(UserWarning, match="both classes"):
        assert all(math.isnan(v) for v in metrics.auroc_aggregates(scores, np.zeros(len(scores), bool)).values())
