"""vLLM general plugin (entry point ``vllm.general_plugins: epikern``): registers the draft model
class and hooks the model runner. vLLM calls :func:`register` in every process it starts."""

from __future__ import annotations

from .export import ARCHITECTURE


def register() -> None:
    from vllm import ModelRegistry

    from . import runner_hooks

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "epikern.integrations.vllm.model:DraftEnsembleForCausalLM")
    runner_hooks.install()
