"""epikern.integrations.hf.generate inside transformers' generate(custom_generate=…): the target's own
greedy tokens (γ = 0, 1, 3; batch 1 and 3, left padding, eos), DraftEstimator.generate's EU, the
target's law when sampling with transformers' seed, the real SmolLM2 path, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import epikern as ek
from epikern.eval.speculative_models import early_exit_drafts
from epikern.integrations import hf
from epikern.models import DraftEnsemble, DraftEstimator
from ..models.helpers import (TEMPERATURE, V_SMALL, chi_square_pvalue, one_thread,  # noqa: F401
                              sequence_index, small_vocab_laws, tiny_model)

EU_ATOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    """A 3-layer target, K = 4 drafts cloned from it with small noise (some proposals accepted,
    some rejected), a proxy, left-padded prompts, and an eos id row 0 emits mid-way."""
    target = tiny_model("llama", seed=5, num_hidden_layers=3)
    drafts = DraftEnsemble.from_base(target, 4, 2, seed=1, jitter=0.05)
    proxy = tiny_model("llama", seed=9, num_hidden_layers=2)
    ids = torch.randint(0, target.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :4] = 0
    free = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    return target, drafts, proxy, ids, mask, int(free[0, 6 + 5])


def _assert_uncertainty_close(a, b):
    for name, x, y in zip(ek.DraftUncertainty._fields, a, b):
        torch.testing.assert_close(x, y, atol=EU_ATOL, rtol=1e-4, equal_nan=True, msg=name)


@pytest.mark.parametrize("with_eos", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("gamma", [0, 1, 3])
def test_greedy_tokens_are_the_targets_and_eu_is_the_estimators(tiny, gamma, batch, with_eos):
    target, drafts, _, ids, mask, eos = tiny
    ids, mask, eos = ids[:batch], mask[:batch], (eos if with_eos else None)
    options = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=7, eos_token_id=eos)
    plain = target.generate(ids, **options)
    out = target.generate(ids, **options, custom_generate=hf.generate, drafts=drafts, speculative_tokens=gamma,
                          return_dict_in_generate=True)
    assert isinstance(out, hf.DraftGenerateOutput)
    assert torch.equal(out.sequences, plain)
    ref = DraftEstimator(target, drafts).generate(ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=7,
                                                  speculative_tokens=gamma)
    assert torch.equal(out.generated_mask, ref.generated_mask) and out.stats == ref.stats
    _assert_uncertainty_close(out.uncertainty, ref.uncertainty)
    assert out.uncertainty.eu.shape == (batch, out.sequences.shape[1] - 6)
    assert out.uncertainty.eu[ref.generated_mask].isfinite().all()
    assert out.uncertainty.eu[~ref.generated_mask].isnan().all()  # NaN after eos
    if with_eos:
        assert not out.generated_mask[0, 6:].any() and (out.sequences[0, 6 + 6:] == 7).all()
    tensor = target.generate(ids, **options, custom_generate=hf.generate, drafts=drafts, speculative_tokens=gamma)
    assert torch.equal(tensor, plain)  # without return_dict_in_generate: the sequences


def test_proxy_proposal_and_confidence_are_passed_through(tiny):
    target, drafts, proxy, ids, mask, eos = tiny
    custom = dict(drafts=drafts, speculative_tokens=4, reference=proxy, proposal=2, confidence_threshold=0.5)
    out = target.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=eos, custom_generate=hf.generate, return_dict_in_generate=True, **custom)
    ref = DraftEstimator(target, drafts, proxy).generate(ids, mask, max_new_tokens=12, eos_token_id=eos,
                                                         pad_token_id=0, speculative_tokens=4, proposal=2,
                                                         confidence_threshold=0.5)
    assert torch.equal(out.sequences, ref.sequences) and out.stats == ref.stats
    assert out.stats.reference_forwards == out.stats.rounds and min(out.stats.proposed[:-1]) < 4
    _assert_uncertainty_close(out.uncertainty, ref.uncertainty)
    # the generation config's max_length (no max_new_tokens) sets the budget too
    by_length = target.generate(ids, attention_mask=mask, max_length=6 + 12, do_sample=False, pad_token_id=0,
                                eos_token_id=eos, custom_generate=hf.generate, **custom)
    assert torch.equal(by_length, ref.sequences)


@pytest.mark.parametrize("gamma", [0, 2])
def test_sampling_with_transformers_seed_follows_the_target_law(gamma):
    """2000 rows in one call, seeded with torch.manual_seed as transformers' sampling is: the joint
    law of three tokens is the target's at the temperature (not the drafts'); the same seed repeats."""
    case = small_vocab_laws(torch.tensor([0.5, 0.5]))
    options = dict(max_new_tokens=3, do_sample=True, temperature=TEMPERATURE, top_k=0, pad_token_id=0,
                   eos_token_id=None, custom_generate=hf.generate, drafts=case.drafts, speculative_tokens=gamma)
    torch.manual_seed(11)
    out = case.target.generate(case.prompt.expand(2000, -1), **options)
    counts = np.bincount(sequence_index(out[:, 3:]), minlength=V_SMALL ** 3)
    assert chi_square_pvalue(counts, case.p) > 1e-3
    assert chi_square_pvalue(counts, case.q) < 1e-9
    torch.manual_seed(11)
    assert torch.equal(case.target.generate(case.prompt.expand(2000, -1), **options), out)
    several = case.target.generate(case.prompt, **options, num_return_sequences=5)  # transformers expands the batch
    assert several.shape == (5, 6)


def test_bad_options_raise_clear_errors(tiny):
    target, drafts, _, ids, mask, _ = tiny
    call = dict(attention_mask=mask, max_new_tokens=4, pad_token_id=0, custom_generate=hf.generate, drafts=drafts)
    with pytest.raises(ValueError, match=r"does not apply TopKLogitsWarper .*; pass top_k=0"):
        target.generate(ids, **call, do_sample=True)  # transformers' default top_k=50 truncates the law
    with pytest.raises(ValueError, match=r"does not apply TopPLogitsWarper .*; pass top_p=1.0"):
        target.generate(ids, **call, do_sample=True, top_k=0, top_p=0.9)
    with pytest.raises(ValueError, match="does not apply RepetitionPenaltyLogitsProcessor"):
        target.generate(ids, **call, repetition_penalty=1.3)
    with pytest.raises(ValueError, match=r"does not apply Min\w*LengthLogitsProcessor"):
        target.generate(ids, **call, min_new_tokens=2, eos_token_id=3)
    with pytest.raises(ValueError, match="does not support num_beams=2"):
        target.generate(ids, **call, num_beams=2)
    with pytest.raises(ValueError, match="does not support output_scores=True"):
        target.generate(ids, **call, output_scores=True, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="stops at max_new_tokens and eos only, not at MaxTimeCriteria"):
        target.generate(ids, **call, max_time=10.0)
    with pytest.raises(ValueError, match="speculative_tokens must be >= 0, got -1"):
        target.generate(ids, **call, speculative_tokens=-1)
    with pytest.raises(ValueError, match="proposal must be 'mixture' or a draft index"):
        target.generate(ids, **call, speculative_tokens=2, proposal=9)
    with pytest.raises(TypeError, match=r"needs drafts=<a DraftEnsemble>, got NoneType"):
        target.generate(ids, attention_mask=mask, max_new_tokens=4, custom_generate=hf.generate)


def test_smollm2_greedy_text_and_eu(smollm2):
    """The real path: SmolLM2 with early-exit drafts cut from it; transformers' greedy text, the
    estimator's EU, and EU = 0 where the target itself is the one draft."""
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "Tom has 3 boxes with 12 apples each. He eats 5 apples. How many "
                                             "apples are left?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    plain = model.generate(ids, **options)
    drafts = early_exit_drafts(model, num_drafts=2, shared_layers=4, branch_layers=2)
    out = model.generate(ids, **options, custom_generate=hf.generate, drafts=drafts, speculative_tokens=3,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    config = model.generation_config
    ref = DraftEstimator(model, drafts).generate(ids, max_new_tokens=24, eos_token_id=config.eos_token_id,
                                                 pad_token_id=config.pad_token_id, speculative_tokens=3)
    _assert_uncertainty_close(out.uncertainty, ref.uncertainty)
    exact = DraftEnsemble.from_models([model], shared_layers=model.config.num_hidden_layers)
    same = model.generate(ids, **options, custom_generate=hf.generate, drafts=exact, speculative_tokens=4,
                          return_dict_in_generate=True)
    assert torch.equal(same.sequences, plain)
    torch.testing.assert_close(same.uncertainty.eu[same.generated_mask], torch.zeros(int(same.generated_mask.sum())),
                               atol=1e-4, rtol=0)
