"""``epikern bench sweep`` on a nano pipeline: every point scored, sweep.json / sweep.md / plots written,
and a second run that trains and scores nothing; plus the grid, the recipes and the Pareto front."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from epikern.eval import sweep
from epikern.eval.sweep_plots import pareto_front
from epikern.training import drafts as drafts_module
from epikern.training.config import DraftsRecipe, TrainConfig
from epikern.training.pipeline import TinyPipeline
from tests.training.conftest import MICRO_DRAFTS, MICRO_PROXY, MICRO_TARGET, one_thread

NANO = TrainConfig(steps=6, batch_size=8, lr=3e-3, warmup_steps=1, checkpoint_every=0)
PIPELINE = TinyPipeline(target=MICRO_TARGET, ddd=dataclasses.replace(MICRO_DRAFTS, train=NANO),
                        idd=dataclasses.replace(MICRO_DRAFTS, idd=True, train=NANO),
                        proxy=dataclasses.replace(MICRO_PROXY, train=NANO))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    cfg = sweep.SweepConfig(out=str(root / "out"), quick=True, problems=16, models_dir=str(root / "models"),
                            ground_truth_samples=6, tokur_samples=3, oracle_drafts=2, oracle_k=(1, 2), batch_size=8,
                            pipeline=PIPELINE)
    with one_thread():
        return cfg, sweep.run(cfg)


def test_every_point_is_scored_and_written(first):
    cfg, result = first
    saved = json.loads((sweep.Path(cfg.out) / "sweep.json").read_text())
    names = [p.name for p in sweep.grid(3, quick=True)]
    assert [p["name"] for p in saved["points"]] == names
    for p in saved["points"]:
        if p["group"] == "sigma":
            continue
        assert p["rmse"] >= 0 and -1 <= p["pearson"] <= 1 and 0 < p["flops_vs_tokur"] < 1, p["name"]
        assert p["jsd_mean"] >= 0 and p["kl_mean"] >= 0 and p["draft_step_vs_target_step"] > 0, p["name"]
    by_name = {p["name"]: p for p in saved["points"]}
    assert by_name["K=1"]["num_drafts"] == 1 and by_name["K=1"]["jsd_mean"] < 1e-6  # one draft: no variance
    assert by_name["PSD 1x4"]["recipe"]["psd"] is True and by_name["layer-skip S1 n1"]["recipe"]["layer_skip"]
    assert by_name["base"]["drafts"].endswith("drafts_ddd")  # the pipeline's own drafts are re-used
    assert set(saved["references"]) == {"0.1", "0.2"}
    refs = saved["references"]["0.1"]
    assert refs["tokur"]["flops_vs_tokur"] == 1 and refs["entropy"]["rmse"] is None
    assert refs["oracle_drafts"]["rmse"] >= 0 and -1 <= refs["ground_truth"]["split_half_pearson"] <= 1
    assert saved["references"]["0.2"]["ground_truth"]["mean"] > refs["ground_truth"]["mean"]  # more noise, more EU
    # 6 draft points; references, oracle terms of 2 σ; the oracle at K = 1, 2
    assert len(saved["trained"]) == 5 and len(saved["scored"]) == 6 + 2 + 2 + 2
    by_k = saved["oracle_by_k"]
    assert list(by_k) == ["1", "2"] and by_k["1"]["jsd_pearson"] is None  # one member: no variance term
    assert by_k["2"]["rmse"] == refs["oracle_drafts"]["rmse"]  # K = 2, same seed: the references' oracle itself
    assert by_k["1"]["flops_vs_tokur"] < by_k["2"]["flops_vs_tokur"] < 1
    md = (sweep.Path(cfg.out) / "sweep.md").read_text()
    assert "| PSD 1x4 | variants |" in md and "split-half" in md
    for title, path in saved["plots"].items():
        assert (sweep.Path(cfg.out) / path).read_bytes().startswith(PNG), title
    assert "## Oracle drafts against K" in md


def test_oracle_by_k_is_reported_in_numeric_order():
    from epikern.eval.sweep_report import format_sweep

    by_k = {str(k): {"rmse": 1.0 / k, "pearson": 0.1 * k} for k in (16, 2, 9)}  # as json.load gives sort_keys' order
    md = format_sweep({"machine": {}, "evaluation": {"problems": 1, "ground_truth_samples": 2}, "wall_s": 0,
                       "target": {"layers": 1, "heldout_accuracy": 0.5}, "trained": [], "scored": [],
                       "references": {}, "oracle_by_k": by_k, "points": []})
    table = md.split("## Oracle drafts against K")[1].split("## Points")[0]
    rows = [line.split("|")[1].strip() for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| K")]
    assert rows == ["2", "9", "16"]


def test_a_second_run_trains_and_scores_nothing(first, monkeypatch):
    cfg, result = first

    def no_training(*args, **kwargs):
        raise AssertionError("a cached sweep point must not train")

    monkeypatch.setattr(drafts_module, "train_drafts", no_training)
    with one_thread():
        again = sweep.run(dataclasses.replace(cfg, out=cfg.out + "-again"))
    assert again["trained"] == [] and again["scored"] == []
    assert [p["rmse"] for p in again["points"] if "rmse" in p] == [p["rmse"] for p in result["points"] if "rmse" in p]


def test_recipes_of_points():
    base = DraftsRecipe(target="t")
    point = sweep.SweepPoint("p", "variants", {"psd": True, "steps": 400, "partitions": 1}, sigma=0.2)
    recipe = sweep.drafts_recipe(point, base)
    assert (recipe.psd, recipe.sigma, recipe.train.steps, recipe.partitions) == (True, 0.2, 400, 1)
    assert recipe.train.warmup_steps == base.train.warmup_steps
    names = [p.name for p in sweep.grid(6)]
    assert len(names) == len(set(names)) and {"S4 n2", "3x3", "1x4 IDD", "PSD 1x4", "1600 steps"} <= set(names)
    with pytest.raises(ValueError, match="unknown sweep points"):
        sweep.run(sweep.SweepConfig(points=("nope",), pipeline=PIPELINE, models_dir="/nonexistent/never"))


def test_pareto_front():
    cost = [0.1, 0.2, 0.3, 0.15, np.nan]
    auroc = [0.6, 0.7, 0.65, 0.55, 0.9]
    assert pareto_front(cost, auroc, higher_is_better=True) == [0, 1]
    assert pareto_front(cost, [1.0, 0.5, 0.2, 2.0, 0.1], higher_is_better=False) == [0, 1, 2]


def test_cli_lists_the_points_and_refuses_unknown_ones(capsys):
    from epikern import cli

    assert cli.main(["bench", "sweep", "--list"]) == 0
    out = capsys.readouterr().out
    assert "PSD 1x4" in out and "layer-skip S1 n1" in out and "3x3" in out
    with pytest.raises(SystemExit):
        cli.main(["bench", "sweep", "--points", "nope"])
    assert "unknown sweep points" in capsys.readouterr().err
