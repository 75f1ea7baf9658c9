"""TrainConfig's schedule and validation; recipe (de)serialisation and the resume diff."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from epikern.training.config import (DraftsRecipe, ProxyRecipe, TargetRecipe, TrainConfig, config_diff, from_dict,
                                     to_dict)


def test_warmup_then_cosine_to_min_lr():
    c = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert [c.lr_at(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert c.lr_at(9) == pytest.approx(1.0)
    assert c.lr_at(10) == pytest.approx(1.0)
    assert c.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert c.lr_at(110) == pytest.approx(0.1)
    lrs = [c.lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_no_warmup_starts_at_peak():
    c = TrainConfig(steps=5, lr=2.0, warmup_steps=0, min_lr_ratio=0.0)
    assert c.lr_at(0) == pytest.approx(2.0)
    assert c.lr_at(5) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps must be a positive int"),
    ({"batch_size": -1}, "batch_size must be a positive int"),
    ({"steps": 5, "warmup_steps": 6}, r"warmup_steps must be an int in \[0, steps=5\]"),
    ({"lr": math.nan}, "lr must be a finite number > 0"),
    ({"min_lr_ratio": 1.5}, r"min_lr_ratio must be in \[0, 1\]"),
    ({"betas": (0.9, 1.0)}, "betas must be two numbers"),
    ({"checkpoint_every": -1}, "checkpoint_every must be an int >= 0"),
])
def test_bad_train_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("recipe", [TargetRecipe(), DraftsRecipe(target="t", idd=True), ProxyRecipe(target="t")])
def test_recipes_round_trip_through_json(recipe):
    data = json.loads(json.dumps(to_dict(recipe)))
    assert data == to_dict(recipe)
    assert from_dict(type(recipe), data) == recipe


def test_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['stepz'\]"):
        from_dict(TrainConfig, {"stepz": 3})


def test_config_diff_names_nested_fields_with_both_values():
    a = to_dict(DraftsRecipe(target="t"))
    b = to_dict(dataclasses.replace(DraftsRecipe(target="t"), partitions=4,
                                    train=dataclasses.replace(DraftsRecipe().train, lr=1e-4)))
    assert config_diff(a, a) == []
    assert config_diff(a, b) == ["partitions: 2 (checkpoint) vs 4 (now)",
                                 f"train.lr: {DraftsRecipe().train.lr!r} (checkpoint) vs 0.0001 (now)"]
