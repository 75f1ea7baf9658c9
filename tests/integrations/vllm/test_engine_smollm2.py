"""vLLM with drafts cut from SmolLM2-135M-Instruct (its first 4 layers, K clones with jittered
branches over a 2-layer trunk): greedy tokens = HF generate, EU = DraftEstimator's within 1e-3."""

from __future__ import annotations

import pytest
import torch

import epikern as ek
import epikern.integrations.vllm as ekv

from .conftest import close, make_llm, require_vllm

require_vllm()
from vllm import SamplingParams  # noqa: E402

from epikern.integrations.vllm.bench import drafts_cut_from  # noqa: E402  (imports vllm)

PROMPTS = ["The three primary colors are", "Q: What is 12 + 7?\nA:"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def smollm2_dir(smollm2, tmp_path_factory):
    model, tokenizer = smollm2
    path = tmp_path_factory.mktemp("smollm2") / "target"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("num_drafts", [1, 2, 4])
def test_greedy_tokens_and_eu_on_smollm2(smollm2, smollm2_dir, tmp_path, num_drafts):
    model = smollm2[0]
    drafts = drafts_cut_from(model, num_drafts, layers=4, shared_layers=2)
    draft_dir = ekv.export_drafts(drafts, tmp_path / "drafts")
    llm = make_llm(smollm2_dir, **ekv.engine_args(draft_dir, speculative_tokens=3, target=smollm2_dir))
    try:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
        eus = ekv.uncertainty(llm, outs)
    finally:
        close(llm)
    estimator = ek.DraftEstimator(model, drafts)
    for out, u in zip(outs, eus):
        prompt = torch.tensor([out.prompt_token_ids])
        ref = estimator.generate(prompt, max_new_tokens=MAX_TOKENS)
        hf = model.generate(prompt, do_sample=False, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS)
        tokens = list(out.outputs[0].token_ids)
        assert tokens == hf[0, prompt.shape[1]:].tolist() == ref.sequences[0, prompt.shape[1]:].tolist()
        for name in ("eu", "jsd", "kl", "target_entropy"):
            torch.testing.assert_close(getattr(u, name), getattr(ref.uncertainty, name)[0], rtol=0, atol=1e-3, msg=name)
