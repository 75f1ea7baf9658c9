"""epikern.eval.metrics against scikit-learn / scipy and hand-computed cases."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import mean_squared_error, roc_auc_score, roc_curve

from epikern.eval import metrics as M


def _responses(rng, n=12, lo=1, hi=30):
    lengths = rng.integers(lo, hi, n)
    truth = [rng.gamma(1.0, 0.3, L) for L in lengths]
    pred = [t + rng.normal(0, 0.2, t.size) for t in truth]
    return pred, truth


# --------------------------------------------------------------------------------------------
# token level


def test_token_metrics_match_sklearn_and_scipy_over_valid_tokens():
    rng = np.random.default_rng(0)
    pred, truth = _responses(rng)
    pred[0][0] = np.nan
    truth[1][-1] = np.inf
    mask = [rng.random(p.size) > 0.2 for p in pred]
    keep = np.concatenate(mask) & np.isfinite(np.concatenate(pred)) & np.isfinite(np.concatenate(truth))
    p, t = np.concatenate(pred)[keep], np.concatenate(truth)[keep]
    assert M.rmse(pred, truth, mask) == pytest.approx(math.sqrt(mean_squared_error(t, p)), rel=1e-12)
    assert M.pearson(pred, truth, mask) == pytest.approx(stats.pearsonr(p, t).statistic, rel=1e-12)
    assert M.spearman(pred, truth, mask) == pytest.approx(stats.spearmanr(p, t).statistic, rel=1e-12)
    tm = M.token_metrics(pred, truth, mask)
    assert tm["n_tokens"] == keep.sum()
    assert tm["n_invalid"] == np.concatenate(mask).sum() - keep.sum()
    assert tm["rmse"] == M.rmse(pred, truth, mask)


def test_token_metrics_known_values_and_flat_arrays():
    pred, truth = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 6.0])
    assert M.rmse(pred, truth) == pytest.approx(1.0)  # sqrt(4 / 4)
    assert M.pearson(pred, 2 * pred + 1) == pytest.approx(1.0)
    assert M.spearman(pred, pred ** 3) == pytest.approx(1.0)
    assert M.spearman(pred, -pred) == pytest.approx(-1.0)


def test_token_metrics_undefined_cases_are_nan_with_a_warning():
    with pytest.warns(UserWarning, match="constant"):
        assert math.isnan(M.pearson(np.ones(5), np.arange(5.0)))
    with pytest.warns(UserWarning, match="need >= 2"):
        assert math.isnan(M.spearman([np.array([1.0])], [np.array([2.0])]))
    with pytest.warns(UserWarning, match="no valid"):
        assert math.isnan(M.rmse([np.array([np.nan])], [np.array([1.0])]))


def test_token_metrics_reject_mismatched_layouts():
    with pytest.raises(ValueError, match="response 1"):
        M.rmse([np.zeros(3), np.zeros(4)], [np.zeros(3), np.zeros(5)])
    with pytest.raises(ValueError, match="2 responses, truth has 1"):
        M.pearson([np.zeros(3), np.zeros(3)], [np.zeros(3)])
    with pytest.raises(ValueError, match="1-D"):
        M.rmse(np.zeros((2, 3)), np.zeros((2, 3)))


# --------------------------------------------------------------------------------------------
# aggregation


def test_aggregate_features_and_names():
    rng = np.random.default_rng(1)
    scores = [rng.random(L) for L in (1, 4, 9, 20)]
    X, names = M.aggregate(scores, ("mean", "max", "min", "sum", "std", "last", "last_k_mean", "q90", "q50"),
                           last_k=5)
    assert names == ["mean", "max", "min", "sum", "std", "last", "last5_mean", "q90", "q50"]
    expected = np.array([[s.mean(), s.max(), s.min(), s.sum(), s.std(), s[-1], s[-5:].mean(),
                          np.quantile(s, 0.9), np.median(s)] for s in scores])
    np.testing.assert_allclose(X, expected, rtol=1e-12)
    assert X.shape == (4, 9)


def test_aggregate_leaves_out_non_finite_tokens_and_flags_empty_responses():
    with pytest.warns(UserWarning) as record:
        X, _ = M.aggregate([np.array([1.0, np.nan, 3.0]), np.array([np.inf]), np.array([])], ("mean", "sum"))
    messages = " ".join(str(w.message) for w in record)
    assert "left out 2 non-finite" in messages and "2 responses have no finite" in messages
    np.testing.assert_array_equal(X[0], [2.0, 4.0])
    assert np.isnan(X[1:]).all()


def test_aggregate_rejects_unknown_features():
    with pytest.raises(ValueError, match="unknown feature 'median'"):
        M.aggregate([np.ones(3)], ("mean", "median"))
    with pytest.raises(ValueError, match="last_k"):
        M.aggregate([np.ones(3)], ("mean",), last_k=0)


# --------------------------------------------------------------------------------------------
# detection


def _detection_data(rng, n=120, signal=1.0):
    wrong = rng.random(n) < 0.4
    lengths = rng.integers(5, 25, n)
    tokens = [rng.gamma(1.0, 0.2 + signal * 0.3 * w, L) for w, L in zip(wrong, lengths)]
    return tokens, wrong


def test_auroc_lr_is_the_pooled_out_of_fold_auroc_of_standardised_logistic_regression():
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(2)
    tokens, wrong = _detection_data(rng)
    X, _ = M.aggregate(tokens)
    res = M.auroc_lr(X, wrong, folds=5, seed=3)
    # the same thing by hand: fit on 4 folds, score the 5th
    oof = np.empty(len(wrong))
    for train, test in StratifiedKFold(5, shuffle=True, random_state=3).split(X, wrong):
        scaler = StandardScaler().fit(X[train])
        lr = LogisticRegression(max_iter=1000).fit(scaler.transform(X[train]), wrong[train])
        oof[test] = lr.predict_proba(scaler.transform(X[test]))[:, 1]
    np.testing.assert_allclose(res.scores, oof, rtol=1e-6, atol=1e-9)
    assert res.auroc == pytest.approx(roc_auc_score(wrong, oof))
    assert res.folds == 5 and res.reason is None
    assert res.auroc > 0.75  # the features carry the signal


def test_auroc_lr_scores_are_out_of_fold():
    """On pure noise with many features an in-sample fit looks good; out-of-fold it does not."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(60, 25))
    wrong = np.arange(60) % 2 == 0
    in_sample = LogisticRegression(max_iter=1000).fit(X, wrong).predict_proba(X)[:, 1]
    assert roc_auc_score(wrong, in_sample) > 0.8
    assert M.auroc_lr(X, wrong).auroc < 0.75


def test_auroc_lr_separable_and_small_samples():
    wrong = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0], dtype=bool)
    x = np.where(wrong, 2.0, -2.0) + np.linspace(0, 0.1, 12)
    assert M.auroc_lr(x, wrong).auroc == pytest.approx(1.0)
    # 3 wrong answers: folds drop to 3, said both as a warning and in the result
    wrong3 = np.zeros(12, dtype=bool)
    wrong3[[1, 5, 9]] = True
    with pytest.warns(UserWarning, match="folds reduced from 5 to 3"):
        res = M.auroc_lr(np.where(wrong3, 1.0, 0.0) + np.linspace(0, 0.01, 12), wrong3)
    assert res.folds == 3 and "reduced" in res.reason and np.isfinite(res.auroc)
    # 1 wrong answer, or one class only: NaN with the reason, never an exception
    with pytest.warns(UserWarning, match="only 1 wrong"):
        res = M.auroc_lr(np.arange(12.0), np.arange(12) == 3)
    assert math.isnan(res.auroc) and res.folds == 0 and np.isnan(res.scores).all()
    with pytest.warns(UserWarning, match="all 12 answers are correct"):
        assert math.isnan(M.auroc_lr(np.arange(12.0), np.zeros(12, dtype=bool)).auroc)


def test_auroc_lr_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite values in 1 rows"):
        M.auroc_lr(np.array([[1.0], [np.nan], [2.0], [3.0]]), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="4 entries for 3"):
        M.auroc_lr(np.zeros((3, 2)), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="boolean or 0/1"):
        M.auroc_lr(np.zeros((4, 1)), [0, 2, 0, 1])


def test_auroc_tokur_is_the_auroc_of_the_negated_sum_for_correct_answers():
    rng = np.random.default_rng(5)
    tokens, wrong = _detection_data(rng, n=80)
    sums = np.array([t.sum() for t in tokens])
    value = M.auroc_tokur(tokens, wrong)
    assert value == pytest.approx(roc_auc_score(~wrong, -sums))
    assert value == pytest.approx(roc_auc_score(wrong, sums))
    # hand case with a tie: sums 1, 2, 2, 3 for correct, wrong, correct, wrong → 3.5 / 4
    toks = [np.array([1.0]), np.array([1.0, 1.0]), np.array([2.0]), np.array([3.0])]
    assert M.auroc_tokur(toks, [0, 1, 0, 1]) == pytest.approx(0.875)
    with pytest.warns(UserWarning, match="all 2 answers are wrong"):
        assert math.isnan(M.auroc_tokur([np.ones(2), np.ones(3)], [1, 1]))


def test_roc_points_match_sklearn():
    rng = np.random.default_rng(6)
    wrong = rng.random(50) < 0.5
    s = wrong + rng.normal(0, 1, 50)
    fpr, tpr, auc = M.roc_points(s, wrong)
    ref_fpr, ref_tpr, _ = roc_curve(wrong, s)
    np.testing.assert_array_equal(fpr, ref_fpr)
    np.testing.assert_array_equal(tpr, ref_tpr)
    assert auc == pytest.approx(roc_auc_score(wrong, s))
    with pytest.raises(ValueError, match="both classes"):
        M.roc_points(s, np.zeros(50, dtype=bool))
    with pytest.raises(ValueError, match="non-finite"):
        M.roc_points(np.r_[s[:-1], np.nan], wrong)


# --------------------------------------------------------------------------------------------
# PRR


def test_prr_known_cases():
    rng = np.random.default_rng(7)
    wrong = rng.random(40) < 0.3
    assert M.prr(wrong.astype(float), wrong) == pytest.approx(1.0)  # oracle
    assert M.prr(-wrong.astype(float), wrong) == pytest.approx(-1.0)  # reversed oracle
    assert M.prr(np.ones(40), wrong) == pytest.approx(0.0, abs=1e-12)  # all tied = random in expectation
    # by hand: order w, c, w, c → errors left ·n = 2, 1, 1, 0, 0 (Σ 4); random 2, 1.5, 1, .5, 0 (Σ 5);
    # oracle 2, 1, 0, 0, 0 (Σ 3) → PRR = (5 − 4) / (5 − 3)
    assert M.prr([4.0, 3.0, 2.0, 1.0], [1, 0, 1, 0]) == pytest.approx(0.5)
    np.testing.assert_allclose(M.rejection_curve([4.0, 3.0, 2.0, 1.0], [1, 0, 1, 0]) * 4, [2, 1, 1, 0, 0])


def test_prr_of_random_scores_is_zero_in_expectation():
    rng = np.random.default_rng(8)
    wrong = rng.random(100) < 0.4
    values = [M.prr(rng.random(100), wrong) for _ in range(300)]
    assert abs(np.mean(values)) < 0.03
    assert np.std(values) > 0.05  # each draw is random, the mean is not


def test_prr_ties_are_the_mean_over_orderings():
    scores = np.array([1.0, 1.0, 1.0, 0.0, 2.0])
    wrong = np.array([1, 0, 0, 1, 0], dtype=bool)
    tied = np.flatnonzero(scores == 1.0)
    orderings = []
    for perm in itertools.permutations(range(tied.size)):
        s = scores.copy()
        s[tied] = 1.0 + 1e-3 * np.array(perm)
        orderings.append(M.prr(s, wrong))
    assert M.prr(scores, wrong) == pytest.approx(np.mean(orderings))


def test_prr_undefined_for_one_class():
    with pytest.warns(UserWarning, match="PRR needs both classes"):
        assert math.isnan(M.prr(np.arange(4.0), np.ones(4, dtype=bool)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.prr(np.arange(4.0), [0, 1, 0, 0])
