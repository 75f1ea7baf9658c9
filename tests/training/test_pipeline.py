"""build_tiny: the whole pipeline in one call, cached by its recipes (a second call trains nothing)."""

from __future__ import annotations

import dataclasses

import pytest

from epikern.models import DraftEnsemble
from epikern.models.loading import load_causal_lm
from epikern.training import pipeline
from epikern.training.config import TrainConfig
from epikern.training.pipeline import TinyPipeline, build_tiny, tiny_pipeline

from .conftest import MICRO_DRAFTS, MICRO_PROXY, MICRO_TARGET

NANO = TrainConfig(steps=3, batch_size=4, warmup_steps=1, checkpoint_every=0)
NANO_PIPELINE = TinyPipeline(
    target=dataclasses.replace(MICRO_TARGET, train_problems=200, heldout_problems=8, response_prompts=8,
                               train=dataclasses.replace(NANO, steps=10)),
    ddd=dataclasses.replace(MICRO_DRAFTS, train=NANO),
    idd=dataclasses.replace(MICRO_DRAFTS, idd=True, train=NANO),
    proxy=dataclasses.replace(MICRO_PROXY, train=NANO),
)


def test_build_tiny_trains_once_then_reuses_its_outputs(tmp_path, monkeypatch):
    models = build_tiny(tmp_path, pipeline=NANO_PIPELINE, progress=False)
    assert models.root.parent == tmp_path and models.root.name.endswith(NANO_PIPELINE.key())
    load_causal_lm(models.target)
    load_causal_lm(models.proxy)
    assert DraftEnsemble.from_pretrained(models.drafts_ddd).num_drafts == 2
    assert DraftEnsemble.from_pretrained(models.drafts_idd).num_drafts == 2
    assert models.drafts_ddd_osd is None and models.responses.is_file() and models.heldout.is_file()
    assert 0 <= models.metrics["metrics"]["target"]["heldout_accuracy"] <= 1
    assert set(models.metrics["seconds"]) == {"target", "drafts_ddd", "drafts_idd", "proxy", "diagnostics", "total"}
    assert models.metrics["diagnostics"]["jsd_ddd"] > 0

    def no_training(*args, **kwargs):
        raise AssertionError("a cached build must not train")

    for name in ("train_target", "train_drafts", "train_proxy"):
        monkeypatch.setattr(pipeline, name, no_training)
    again = build_tiny(tmp_path, pipeline=NANO_PIPELINE, progress=False)
    assert again == models
    # another recipe is another build
    changed = dataclasses.replace(NANO_PIPELINE, proxy=dataclasses.replace(NANO_PIPELINE.proxy, sigma=0.2))
    assert changed.key() != NANO_PIPELINE.key()
    with pytest.raises(AssertionError, match="must not train"):
        build_tiny(tmp_path, pipeline=changed, progress=False)


def test_build_tiny_resumes_a_killed_build_stage_by_stage(tmp_path, monkeypatch):
    real = pipeline.train_proxy

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_proxy", killed)
    with pytest.raises(KeyboardInterrupt):
        build_tiny(tmp_path, pipeline=NANO_PIPELINE, progress=False)
    calls = []
    monkeypatch.setattr(pipeline, "train_proxy", lambda *a, **k: calls.append(k) or real(*a, **k))
    for name in ("train_target", "train_drafts"):
        monkeypatch.setattr(pipeline, name, lambda *a, **k: pytest.fail("finished stages are not rerun"))
    models = build_tiny(tmp_path, pipeline=NANO_PIPELINE, progress=False)
    assert len(calls) == 1 and load_causal_lm(models.proxy)


def test_default_and_quick_pipelines_differ_only_in_size():
    default, quick = tiny_pipeline(), tiny_pipeline(quick=True)
    assert default.key() != quick.key()
    assert default.target.model == dataclasses.replace(quick.target.model, num_layers=6)
    assert (default.ddd.partitions, default.ddd.drafts_per_partition, default.ddd.shared_layers) == (2, 2, 1)
    assert default.idd == dataclasses.replace(default.ddd, idd=True)
    assert quick.target.train.steps < default.target.train.steps


def test_a_build_whose_drafts_changed_copies_the_finished_target(tmp_path, monkeypatch):
    first = build_tiny(tmp_path, pipeline=NANO_PIPELINE, progress=False)
    monkeypatch.setattr(pipeline, "train_target", lambda *a, **k: pytest.fail("the same target is not retrained"))
    longer = dataclasses.replace(NANO_PIPELINE.ddd, train=dataclasses.replace(NANO, steps=4))
    changed = dataclasses.replace(NANO_PIPELINE, ddd=longer)
    models = build_tiny(tmp_path, pipeline=changed, progress=False)
    assert models.root != first.root
    assert (models.target / "model.safetensors").read_bytes() == (first.target / "model.safetensors").read_bytes()
    assert models.metrics["metrics"]["target"] == first.metrics["metrics"]["target"]
    assert "target" not in models.metrics["seconds"] and "drafts_ddd" in models.metrics["seconds"]
    assert not list(tmp_path.glob("*/*.copying"))


def test_the_embedded_drafts_are_the_papers_recipe_with_psd_at_sigma_02_and_400_steps():
    paper, default = tiny_pipeline(paper=True), tiny_pipeline()
    assert paper.target == default.target and paper.proxy == default.proxy
    assert default.ddd == dataclasses.replace(paper.ddd, psd=True, sigma=0.2,
                                              train=dataclasses.replace(paper.ddd.train, steps=400))
    assert not paper.ddd.psd and paper.ddd.train.steps == 80  # what `epikern train drafts` and the sweep start from
    assert tiny_pipeline(quick=True).ddd.train.steps == tiny_pipeline(quick=True, paper=True).ddd.train.steps
