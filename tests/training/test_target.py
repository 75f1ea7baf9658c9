"""The tiny target recipe on a micro config: an HF directory, graded held-out answers, stored responses."""

from __future__ import annotations

import json

import pytest
import torch

from epikern.data import encode_prompt, is_correct
from epikern.models.loading import CheckpointError, load_causal_lm
from epikern.training.checkpoint import load_checkpoint
from epikern.training.responses import generate, read_responses
from epikern.training.target import CHECKPOINT, read_heldout

from .conftest import MICRO_TARGET


def test_target_is_an_hf_directory_trained_with_falling_loss(micro_target):
    out, metrics = micro_target
    model, tok = load_causal_lm(out)
    assert model.config.vocab_size == len(tok) == 100 and model.config.num_hidden_layers == 3
    losses = load_checkpoint(out / CHECKPOINT).losses
    assert len(losses) == MICRO_TARGET.train.steps
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert 0.0 <= metrics["heldout_accuracy"] <= 1.0 and metrics["heldout_problems"] == 24


def test_heldout_answers_are_the_greedy_answers_and_graded(micro_target):
    out, metrics = micro_target
    model, tok = load_causal_lm(out)
    rows = read_heldout(out / "heldout.jsonl")
    assert len(rows) == 24
    assert metrics["heldout_accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 24)
    for r in rows:
        assert r["prompt_ids"] == encode_prompt(tok, r["question"])
        assert r["response"] == tok.decode(r["response_ids"], skip_special_tokens=True)
        assert r["correct"] == is_correct(r["response"], r["reference"])
    # the same greedy tokens as HF generate on one prompt alone (no padding)
    ids = torch.tensor([rows[0]["prompt_ids"]])
    alone = model.generate(ids, max_new_tokens=MICRO_TARGET.max_new_tokens, do_sample=False,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    expected = alone[:alone.index(tok.eos_token_id) + 1] if tok.eos_token_id in alone else alone
    assert rows[0]["response_ids"] == expected


def test_responses_are_r_samples_per_training_prompt_with_their_ids(micro_target):
    out, _ = micro_target
    model, tok = load_causal_lm(out)
    responses = read_responses(out / "responses.jsonl", vocab_size=len(tok))
    R = MICRO_TARGET.responses_per_prompt
    assert len(responses) == MICRO_TARGET.response_prompts * R
    assert [(r.prompt, r.sample) for r in responses] == [(p, s) for p in range(24) for s in range(R)]
    for r in responses:
        assert list(r.prompt_ids) == encode_prompt(tok, r.question)
        assert r.text == tok.decode(list(r.response_ids), skip_special_tokens=True)
        assert r.finished == (r.response_ids[-1] == tok.eos_token_id)
        assert tok.eos_token_id not in r.response_ids[:-1]
        assert len(r.response_ids) <= MICRO_TARGET.max_new_tokens
    assert len({r.response_ids for r in responses}) > len(responses) // 2  # sampled, not greedy
    # sampling is seeded: the same call gives the same tokens
    questions = [responses[0].question, responses[R].question]
    a = generate(model, tok, questions, max_new_tokens=8, do_sample=True, num_return_sequences=2, seed=3)
    b = generate(model, tok, questions, max_new_tokens=8, do_sample=True, num_return_sequences=2, seed=3)
    assert a == b and len(a) == 4


def test_a_directory_with_a_run_is_never_overwritten(micro_target, tmp_path):
    from epikern.training.target import train_target

    out, _ = micro_target
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(CheckpointError, match="already holds files .*nothing was changed. Pass --resume"):
        train_target(MICRO_TARGET, out, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(CheckpointError, match="holds no run to resume"):
        train_target(MICRO_TARGET, tmp_path / "empty", resume=True, progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "recipe.json").write_text(json.dumps({"train_problems": 1}))
    with pytest.raises(CheckpointError, match="started with a different config .*train_problems: 1 \\(checkpoint\\) "
                                              "vs 400 \\(now\\)"):
        train_target(MICRO_TARGET, tmp_path / "bad", resume=True, progress=False)
