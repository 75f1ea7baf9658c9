"""``epikern train`` (epikern.training.cli): parsing, presets, a drafts run, and its errors."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from epikern.models import DraftEnsemble
from epikern.training import presets
from epikern.training.cli import build_parser, ddd_spec, recipe_from_args, run_module


@pytest.mark.parametrize("text, expected", [("2x2", (2, 2)), ("4×1", (4, 1)), (" 3X5 ", (3, 5))])
def test_ddd_spec(text, expected):
    assert ddd_spec(text) == expected


@pytest.mark.parametrize("text, match", [("0x2", "need at least 1 partition and 1 draft per partition .*A=0, B=2"),
                                         ("2x0", "A=2, B=0"), ("2by2", "must look like AxB")])
def test_bad_ddd_spec(text, match):
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        ddd_spec(text)


def test_ddd_0x2_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["train", "drafts", "--target", "t", "--out", "o", "--ddd", "0x2"])
    assert exc.value.code == 2
    assert "need at least 1 partition" in capsys.readouterr().err


def test_presets_and_overrides():
    args = build_parser().parse_args(["train", "drafts", "--target", "smollm2", "--out", "o", "--ddd", "3x2", "--idd",
                                      "--shared-layers", "2", "--steps", "5", "--responses", "reference", "--quick"])
    recipe = recipe_from_args(args)
    assert (recipe.partitions, recipe.drafts_per_partition, recipe.idd, recipe.osd) == (3, 2, True, False)
    assert recipe.shared_layers == 2 and recipe.responses == "reference" and recipe.target == "smollm2"
    assert recipe.train.steps == 5 and recipe.train.warmup_steps <= 5
    assert recipe.train.lr == presets.drafts(quick=True).train.lr
    quick, default = presets.target(True), presets.target(False)
    assert (quick.model.num_layers, default.model.num_layers) == (3, 6) and quick.train.steps < default.train.steps
    assert quick.model == dataclasses.replace(default.model, num_layers=3)
    deep = recipe_from_args(build_parser().parse_args(["train", "target", "--out", "o", "--layers", "8"]))
    assert deep.model.num_layers == 8 and deep.model.hidden_size == default.model.hidden_size
    shallow = recipe_from_args(build_parser().parse_args(["train", "target", "--out", "o", "--layers", "6", "--quick"]))
    assert shallow.model.num_layers == 6 and shallow.train.steps == quick.train.steps
    with pytest.raises(ValueError, match="--layers must be >= 1, got 0"):
        recipe_from_args(build_parser().parse_args(["train", "target", "--out", "o", "--layers", "0"]))


def test_drafts_command_runs_then_refuses_a_different_resume(micro_target, tmp_path, capsys):
    target_dir, _ = micro_target
    out = tmp_path / "ddd"
    argv = ["drafts", "--target", str(target_dir), "--out", str(out), "--ddd", "1x2", "--steps", "2",
            "--batch-size", "4", "--no-progress"]
    assert run_module(argv) == 0
    assert DraftEnsemble.from_pretrained(out).num_drafts == 2
    assert run_module(argv + ["--resume"]) == 0  # finished: resuming trains nothing more
    assert run_module(argv + ["--resume", "--lr", "0.5"]) == 2
    assert "train.lr:" in capsys.readouterr().err
    assert run_module(argv) == 2
    assert "already holds files" in capsys.readouterr().err
    assert run_module(["drafts", "--target", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"), "--ddd", "1x1"]) == 2
    assert "no model at" in capsys.readouterr().err
    assert run_module(["drafts", "--target", str(target_dir), "--out", str(tmp_path / "y"), "--ddd", "30x1"]) == 2
    assert "more partitions than prompts" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_module_entry_point_is_the_train_command():
    run = subprocess.run([sys.executable, "-m", "epikern.training", "drafts", "--help"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "--ddd AxB" in run.stdout and "--shared-layers" in run.stdout
