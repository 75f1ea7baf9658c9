"""``epikern bench`` end to end: the --quick run from nothing (training included), its report and
plots, the cached second run, bad options, and the real path on SmolLM2 with drafts trained for it.

The quick run trains the tiny pipeline into a fresh directory, as a first run on a new machine does
(about 2 minutes on 2 cores); nothing here checks a time.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from epikern.eval import bench
from epikern.eval.report import validate_report
from epikern.eval.results import METHODS

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    cfg = bench.BenchConfig(quick=True, out=str(root / "out"), models_dir=str(root / "models"))
    return root, bench.run(cfg)


def test_quick_run_reports_every_method_on_the_same_responses(quick):
    root, report = quick
    saved = json.loads((root / "out" / "report.json").read_text())  # strict JSON: no NaN extension
    validate_report(saved)
    assert set(METHODS) <= set(saved["methods"])
    assert saved["dataset"]["problems"] == 96 and saved["dataset"]["generated_tokens"] > 96
    methods = saved["methods"]
    for name in ("drafts_ddd", "drafts_ddd_osd", "drafts_idd", "single_draft", "tokur"):
        m = methods[name]
        assert m["rmse"] is not None and m["rmse"] >= 0 and -1 <= m["pearson"] <= 1, name
        assert m["flops_per_token"] > 0 and m["latency_ms_per_token"] > 0, name
    for name in ("entropy", "maxprob", "loglik", "length"):
        assert methods[name]["rmse"] is None and "not an EU estimate" in methods[name]["rmse_reason"]
    for name in ("drafts_ddd", "drafts_idd", "oracle_drafts", "tokur"):
        assert 0 <= methods[name]["rmse_calibrated"] <= methods[name]["rmse"] * 1.5, name
    for name in METHODS:  # the aggregates alone, beside the logistic regression
        assert all(0 <= methods[name][f"auroc_{a}"] <= 1 for a in ("mean", "max", "sum")), name
    assert methods["length"]["auroc_sum"] == methods["length"]["auroc_tokur"]  # Σ 1 = the length
    assert "oracle drafts: K=4" in methods["oracle_drafts"]["description"]
    assert 0.4 < methods["oracle_drafts"]["flops_vs_tokur"] < 0.6  # K + 1 = 5 of TokUR's M = 10 forwards
    assert -1 <= saved["ground_truth"]["split_half_pearson"] <= 1
    # the drafts cost a fraction of TokUR's M target forwards; the single draft less than four
    assert all(methods[n]["flops_vs_tokur"] < 1 for n in ("drafts_ddd", "drafts_idd", "single_draft"))
    assert methods["single_draft"]["flops_per_token"] < methods["drafts_ddd"]["flops_per_token"]
    assert methods["drafts_ddd_osd"]["flops_per_token"] > methods["drafts_ddd"]["flops_per_token"]  # + proxy
    assert saved["ground_truth"]["num_samples"] == 32
    assert saved["ground_truth"]["flops_per_token"] > methods["tokur"]["flops_per_token"]
    training = saved["training"]
    assert 0 <= training["target_heldout_accuracy"] <= 1 and training["jsd_ddd"] > 0
    rows = {r["name"]: r for r in saved["speculative"]}
    assert {"hf", "plain", "spec+EU γ=1"} <= set(rows)
    assert all(r["same_tokens"] for r in rows.values())  # greedy speculative = plain decoding
    assert 0 <= rows["spec+EU γ=1"]["acceptance"] <= 1 and rows["spec+EU γ=1"]["speedup_vs_plain_eu"] > 0
    assert saved["speculative_steps"]["draft_step_vs_target_step"] > 0  # the cost model behind the rows
    for title, path in saved["plots"].items():
        assert (root / "out" / path).read_bytes().startswith(PNG), title
    md = (root / "out" / "report.md").read_text()
    assert "| drafts_ddd |" in md and "![" in md


def test_second_run_reuses_the_models(quick, monkeypatch):
    root, _ = quick
    from epikern.training import pipeline

    def no_training(*args, **kwargs):
        raise AssertionError("the cached run trained a model")

    for name in ("train_target", "train_drafts", "train_proxy"):
        monkeypatch.setattr(pipeline, name, no_training)
    cfg = bench.BenchConfig(quick=True, out=str(root / "again"), models_dir=str(root / "models"), problems=8,
                            gammas=(2,))
    report = bench.run(cfg)
    assert report["dataset"]["problems"] == 8
    assert report["training"]["root"] == json.loads((root / "out" / "report.json").read_text())["training"]["root"]


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "gsm8k"], "needs --target"),
    (["--drafts", "x"], "need --target"),
    (["--problems", "0"], "--problems must be >= 1"),
    (["--tokur-samples", "1"], "must be >= 2"),
    (["--gammas", "0"], "--gammas must be >= 1"),
])
def test_bad_options_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_real_path_on_smollm2_with_drafts_trained_for_it(smollm2, tmp_path):
    """`epikern train drafts --target smollm2` then `epikern bench --target smollm2 --dataset gsm8k`
    on two problems (the CI smoke run; the full run is documented for a GPU)."""
    drafts = tmp_path / "drafts"
    train = [sys.executable, "-m", "epikern.cli", "train", "drafts", "--target", "smollm2", "--out", str(drafts),
             "--ddd", "2x1", "--shared-layers", "2", "--prompts", "2", "--max-new-tokens", "16", "--steps", "3",
             "--batch-size", "2", "--threads", "2", "--no-progress"]
    subprocess.run(train, check=True, capture_output=True)
    report = bench.run(bench.BenchConfig(target="smollm2", dataset="gsm8k", drafts=str(drafts), quick=True,
                                         problems=2, max_new_tokens=16, gammas=(2,), out=str(tmp_path / "out")))
    validate_report(json.loads((tmp_path / "out" / "report.json").read_text()))
    methods = report["methods"]
    assert methods["drafts_ddd"]["rmse"] is not None and methods["tokur"]["rmse"] is not None
    for name in ("drafts_idd", "drafts_ddd_osd"):  # their models were not given: reported, not run
        assert methods[name]["auroc_lr"] is None and "no --" in methods[name]["auroc_lr_reason"]
    assert methods["drafts_ddd"]["flops_vs_tokur"] < 1
    assert report["config"]["models"]["target"]["layers"] == 30
