"""export_drafts / read_drafts / engine_args: the round trip and the errors (no vLLM needed)."""

from __future__ import annotations

import json

import pytest
import torch

import epikern.integrations.vllm as ekv


def test_round_trip_gives_the_same_drafts(tiny, tmp_path):
    _, drafts, _ = tiny
    out = ekv.export_drafts(drafts, tmp_path / "drafts", weights=[0.1, 0.2, 0.3, 0.4])
    back, weights = ekv.read_drafts(out)
    assert weights == [0.1, 0.2, 0.3, 0.4]
    assert (back.num_drafts, back.shared_layers) == (drafts.num_drafts, drafts.shared_layers)
    ids = torch.randint(0, drafts.vocab_size, (2, 7))
    torch.testing.assert_close(back(ids), drafts(ids), rtol=0, atol=0)


def test_export_config_describes_what_vllm_allocates(tiny, tmp_path):
    _, drafts, _ = tiny
    with open(ekv.export_drafts(drafts, tmp_path / "d") / "config.json") as f:
        config = json.load(f)
    K, S, L, H = drafts.num_drafts, drafts.shared_layers, drafts.num_layers, drafts.config.hidden_size
    assert config["architectures"] == ["EpikernDraftEnsembleForCausalLM"]
    assert config["hidden_size"] == K * H and config["num_hidden_layers"] == S + K * (L - S)
    assert config["vocab_size"] == drafts.vocab_size


def test_engine_args(tiny, tmp_path):
    _, drafts, target_dir = tiny
    out = ekv.export_drafts(drafts, tmp_path / "d")
    args = ekv.engine_args(out, speculative_tokens=2, target=target_dir)
    assert args["speculative_config"] == {"method": "draft_model", "model": str(out), "num_speculative_tokens": 2}
    assert args["worker_extension_cls"].endswith("UncertaintyExtension")


def test_bad_input_gives_clear_errors(tiny, tmp_path):
    target, drafts, target_dir = tiny
    out = ekv.export_drafts(drafts, tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ekv.engine_args(tmp_path / "missing")
    with pytest.raises(ValueError, match="not an epikern draft ensemble export"):
        ekv.engine_args(target_dir)
    for gamma in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="speculative_tokens must be an int >= 1"):
            ekv.engine_args(out, speculative_tokens=gamma)
    other = tmp_path / "other_target"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"vocab_size": 32000}))
    with pytest.raises(ValueError, match="vocabulary of 49152 tokens but the target .* has 32000"):
        ekv.engine_args(out, target=other)
    with pytest.raises(ValueError, match="weights must be 4 non-negative numbers summing to 1"):
        ekv.export_drafts(drafts, tmp_path / "w", weights=[0.5, 0.5])
    with pytest.raises(TypeError, match="must be an epikern.DraftEnsemble"):
        ekv.export_drafts(target, tmp_path / "t")
