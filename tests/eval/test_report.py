"""epikern.eval.report: strict JSON round trip, schema validation, Markdown and terminal tables."""

from __future__ import annotations

import copy
import functools
import json
import math
import re

import numpy as np
import pytest

from epikern.eval import report as R
from epikern.eval.machine import machine_info, versions
from epikern.eval.results import METHOD_METRICS, METHODS, MethodScores, NotRun


def _strict_loads(text: str):
    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=no_constants)


@functools.lru_cache(maxsize=1)
def _setup() -> tuple[dict, dict]:
    return machine_info(), versions()


def _report() -> dict:
    machine, vers = copy.deepcopy(_setup())
    methods = {}
    for i, name in enumerate(METHODS):
        is_eu = name not in ("entropy", "maxprob", "loglik")
        methods[name] = {
            "rmse": 0.1 + 0.01 * i if is_eu else None, "pearson": np.float32(0.5), "spearman": 0.4,
            "auroc_lr": 0.7, "auroc_tokur": 0.69, "prr": 0.3, "latency_ms_per_token": 2.5,
            "flops_per_token": 3.0e7 if name == "tokur" else np.int64(1_500_000),
            "token_scores": np.array([0.1, np.nan]),
        }
        if not is_eu:
            methods[name]["rmse_reason"] = "not an EU estimate"
    methods["maxprob"]["prr"] = float("nan")
    return {"machine": machine, "versions": vers, "config": {"K": 4, "quick": True},
            "methods": methods,
            "ground_truth": {"members": 32, "flops_per_token": 9.6e7, "latency_ms_per_token": 40.0},
            "speculative": [{"name": "plain", "tokens_per_s": 50.0, "acceptance": None,
                             "acceptance_reason": "no drafts"},
                            {"name": "speculative + EU", "tokens_per_s": 70.0, "acceptance": 2.3}]}


def test_write_report_round_trip_is_strict_json(tmp_path):
    rep = _report()
    rep["plots"] = {"ROC curves": str(tmp_path / "roc.png")}
    json_path, md_path = R.write_report(tmp_path, rep)
    back = _strict_loads(json_path.read_text())
    assert back["methods"]["drafts_ddd"]["rmse"] == pytest.approx(0.1)
    assert back["methods"]["entropy"]["rmse"] is None
    assert back["methods"]["entropy"]["rmse_reason"] == "not an EU estimate"
    assert back["methods"]["maxprob"]["prr"] is None and "NaN" in back["methods"]["maxprob"]["prr_reason"]
    assert back["methods"]["tokur"]["token_scores"] == [0.1, None]
    assert "1 non-finite" in back["methods"]["tokur"]["token_scores_reason"]
    assert back["methods"]["drafts_ddd"]["flops_per_token"] == 1_500_000
    assert "multiply-add = 2 FLOPs" in back["conventions"]["flops"]
    assert back["machine"]["cores"] >= 1 and back["versions"]["torch"]
    R.validate_report(back)  # what was written validates again
    md = md_path.read_text()
    assert "| drafts_ddd | 0.100 | — | 0.500 | 0.400 | 0.700 | — | — | — | 0.690 | 0.300 | 1.5 M | 2.5 | 0.05× |" in md
    assert "| tokur |" in md and "| 30 M | 2.5 | 1× |" in md
    assert "- entropy rmse: not an EU estimate" in md
    assert "![ROC curves](roc.png)" in md
    assert "## Speculative decoding" in md and "— (no drafts)" in md
    assert "## Ground truth" in md and "96 M" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]  # no temporaries left


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r.pop("versions"), "report lacks 'versions'"),
    (lambda r: r["methods"].pop("drafts_ddd_osd"), "report['methods'] lacks 'drafts_ddd_osd'"),
    (lambda r: r["methods"]["tokur"].pop("prr"), "report['methods']['tokur'] lacks 'prr'"),
    (lambda r: r["methods"]["loglik"].pop("rmse_reason"), "['loglik']['rmse'] is null without"),
    (lambda r: r["methods"]["tokur"].__setitem__("auroc_lr", "0.7"), "must be a number or null"),
    (lambda r: r["ground_truth"].pop("flops_per_token"), "report['ground_truth'] lacks 'flops_per_token'"),
    (lambda r: r.pop("speculative"), "report lacks 'speculative'"),
    (lambda r: r.__setitem__("speculative", []), "non-empty list"),
    (lambda r: r["speculative"][1].pop("acceptance"), "report['speculative'][1] lacks 'acceptance'"),
    (lambda r: r.__setitem__("config", [1]), "report['config'] must be a dict"),
])
def test_validate_report_names_the_offending_key(mutate, message):
    rep = _report()
    R.validate_report(rep)
    bad = copy.deepcopy(rep)
    mutate(bad)
    with pytest.raises(ValueError, match=re.escape(message)):
        R.validate_report(bad)


def test_invalid_report_is_saved_before_raising(tmp_path):
    rep = _report()
    del rep["methods"]["tokur"]
    with pytest.raises(ValueError, match="lacks 'tokur'.*report.invalid.json"):
        R.write_report(tmp_path, rep)
    saved = _strict_loads((tmp_path / "report.invalid.json").read_text())
    assert "drafts_ddd" in saved["methods"]
    assert not (tmp_path / "report.json").exists()


def test_to_json_compatible_types():
    out = R.to_json_compatible({"a": np.bool_(True), "b": (1, np.int32(2)), "c": -math.inf, "d": None,
                                "e": [[1.0, math.nan], [np.float32("inf")]]})
    assert out == {"a": True, "b": [1, 2], "c": None, "c_reason": "value was -inf", "d": None,
                   "e": [[1.0, None], [None]], "e_reason": "2 non-finite entries written as null"}
    with pytest.raises(TypeError, match=r"report\['x'\] is a set"):
        R.to_json_compatible({"x": {1, 2}})
    with pytest.raises(TypeError, match="non-string key"):
        R.to_json_compatible({1: 2})


def test_methods_table_has_every_method_and_the_ratio():
    text = R.methods_table(_report())
    for name in METHODS:
        assert name in text
    assert "FLOPs ÷ TokUR" in text and "0.05×" in text
    assert "entropy rmse: not an EU estimate" in text
    assert "\x1b[" not in text  # no colour codes


def test_typed_method_entries_validate_and_keep_their_reasons():
    scores = MethodScores(description="K=4 drafts", rmse=None, pearson=0.5, spearman=0.4, auroc_lr=None,
                          auroc_tokur=0.7, prr=None, flops_per_token=2e6, extra_flops_per_token=1e6,
                          latency_ms_per_token=3.0, measured_flops_per_token=2.1e6, peak_memory_bytes=1024,
                          peak_memory_method="rss_high_water_mark", features=["mean", "max"],
                          reasons={"rmse": "not an EU estimate", "prr": "one class", "auroc_lr": "one class"},
                          flops_vs_tokur=0.1)
    entry = scores.to_json()
    assert list(entry)[:3] == ["description", "rmse", "pearson"] and list(entry)[-1] == "flops_vs_tokur"
    assert entry["rmse_reason"] == "not an EU estimate" and "reasons" not in entry
    rep = _report()
    rep["methods"]["drafts_ddd"] = entry
    rep["methods"]["drafts_idd"] = NotRun("not run: no --idd-drafts was given").to_json()
    back = R.validate_report(rep)
    assert back["methods"]["drafts_idd"]["auroc_lr"] is None
    assert back["methods"]["drafts_idd"]["auroc_lr_reason"] == "not run: no --idd-drafts was given"
    assert set(METHOD_METRICS) <= set(back["methods"]["drafts_idd"])
