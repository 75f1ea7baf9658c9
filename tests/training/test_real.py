"""The real path: drafts with a trunk from SmolLM2-135M-Instruct, trained on GSM8K prompts."""

from __future__ import annotations

import copy

import torch

from epikern.data import load_gsm8k
from epikern.models import DraftEnsemble
from epikern.training.config import TrainConfig
from epikern.training.drafts import build_draft
from epikern.training.loop import train
from epikern.training.losses import CleanTeacher, ForwardKL
from epikern.training.responses import reference_responses, sample_responses


def test_two_smollm2_drafts_with_its_trunk_learn_from_two_gsm8k_prompts(smollm2):
    model, tok = smollm2
    target = copy.deepcopy(model).requires_grad_(False)
    problems = load_gsm8k("train")[:2]
    # short reference solutions keep a step cheap on a CPU (the prompt is context, the answer is counted)
    responses = reference_responses(tok, problems)
    examples = [r.example() for r in responses]
    examples = [type(e)(e.input_ids[:e.prompt_length + 24], e.prompt_length) for e in examples]
    teacher = CleanTeacher(target)
    config = TrainConfig(steps=5, batch_size=2, lr=2e-3, warmup_steps=0, grad_clip=1.0, checkpoint_every=0)
    drafts, losses = [], []
    for k in range(2):
        draft = build_draft(target, shared_layers=2, branch_layers=1, seed=k, jitter=0.01)
        result = train(ForwardKL(draft), examples, config, pad_id=tok.pad_token_id, run_config={}, teacher=teacher,
                       progress=False)
        losses.append(result.losses)
        drafts.append(draft.eval())
    print(f"\nSmolLM2 drafts (S=2 trunk + 1 branch layer), forward KL per step: {losses}")
    for curve in losses:
        assert curve[-1] < 0.8 * curve[0], curve
    ens = DraftEnsemble.from_models(drafts, shared_layers=2)
    assert (ens.num_drafts, ens.shared_layers, ens.vocab_size) == (2, 2, 49152)
    torch.testing.assert_close(ens.embed_tokens.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
    v_weight, _ = ens.layers[1].projection("self_attn.v_proj")
    torch.testing.assert_close(v_weight[0], model.model.layers[1].self_attn.v_proj.weight, rtol=0, atol=0)
    assert torch.equal(model.model.embed_tokens.weight, target.model.embed_tokens.weight)  # nothing touched the model


def test_smollm2_sampled_responses_carry_their_token_ids(smollm2):
    model, tok = smollm2
    problem = load_gsm8k("train")[0]
    [response] = sample_responses(model, tok, [problem.question], [problem.final], responses_per_prompt=1,
                                  max_new_tokens=6, seed=0)
    assert 1 <= len(response.response_ids) <= 6
    assert response.text == tok.decode(list(response.response_ids), skip_special_tokens=True)
    assert response.prompt_ids[-3:] == tuple(tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids)[-3:]
