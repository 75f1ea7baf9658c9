"""The tiny-model EU equality on a CUDA device, through vLLM's V1 runner (the hooked one; the V2
runner, the GPU default, is described in docs/vllm.md). Runs where a GPU and the CUDA ``vllm``
are installed."""

from __future__ import annotations

import os

import pytest
import torch

import epikern.integrations.vllm as ekv

from .conftest import close, make_llm, require_vllm

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
require_vllm()
from vllm import SamplingParams  # noqa: E402

from .test_engine_tiny import MAX_TOKENS, PROMPTS, assert_eu_matches, reference  # noqa: E402


def test_eu_equals_draft_estimator_on_gpu(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    target, drafts, target_dir = tiny
    draft_dir = ekv.export_drafts(drafts.select([0, 1]), tmp_path / "drafts")
    llm = make_llm(target_dir, gpu_memory_utilization=0.3, **ekv.engine_args(draft_dir, speculative_tokens=3))
    try:
        outs = llm.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=n) for n in MAX_TOKENS])
        eus = ekv.uncertainty(llm, outs)
    finally:
        close(llm)
    for out, u, n in zip(outs, eus, MAX_TOKENS):
        ref_tokens, ref = reference(target, drafts.select([0, 1]), out.prompt_token_ids, n)
        assert list(out.outputs[0].token_ids) == ref_tokens
        assert_eu_matches(u, ref, n)
