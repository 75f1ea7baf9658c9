"""``epikern bench --target DIR --drafts DIR --idd-drafts DIR --proxy DIR`` on the synthetic task with
the micro models of ``epikern train`` (the custom-checkpoint path a new user takes): it answers the
target's own held-out problems when its directory has them, and fresh synthetic problems otherwise."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from epikern.eval import bench
from epikern.training.drafts import train_drafts
from epikern.training.proxy import train_proxy
from epikern.training.target import HELDOUT_NAME, read_heldout, train_target
from tests.training.conftest import MICRO_DRAFTS, MICRO_PROXY, MICRO_TARGET, one_thread


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    with one_thread():
        train_target(MICRO_TARGET, root / "target", progress=False)
        for name, idd in (("ddd", False), ("idd", True)):
            train_drafts(dataclasses.replace(MICRO_DRAFTS, target=str(root / "target"), idd=idd), root / name,
                         progress=False)
        train_proxy(dataclasses.replace(MICRO_PROXY, target=str(root / "target")), root / "proxy", progress=False)
    return root


def _bench(root, target, out, problems):
    argv = ["--target", str(target), "--drafts", str(root / "ddd"), "--idd-drafts", str(root / "idd"),
            "--proxy", str(root / "proxy"), "--out", str(out), "--quick", "--problems", str(problems),
            "--max-new-tokens", "24", "--gammas", "1"]
    with one_thread():
        assert bench.main(argv) == 0
    return json.loads((out / "report.json").read_text())


def test_custom_checkpoints_answer_the_targets_own_heldout_problems(trained, tmp_path):
    report = _bench(trained, trained / "target", tmp_path / "out", problems=6)
    assert len(read_heldout(trained / "target" / HELDOUT_NAME)) > 6
    assert report["dataset"]["name"] == "synthetic" and report["dataset"]["problems"] == 6
    assert report["config"]["problem_source"] == str(trained / "target" / HELDOUT_NAME)
    for name in ("drafts_ddd", "drafts_ddd_osd", "drafts_idd", "single_draft", "tokur"):
        assert report["methods"][name]["rmse"] is not None, name


def test_a_target_without_heldout_problems_answers_fresh_synthetic_ones(trained, tmp_path):
    bare = tmp_path / "bare-target"
    shutil.copytree(trained / "target", bare, ignore=shutil.ignore_patterns(HELDOUT_NAME))
    report = _bench(trained, bare, tmp_path / "out", problems=5)
    assert report["dataset"]["problems"] == 5 and report["config"]["problem_source"] == "generated (seed 0)"
