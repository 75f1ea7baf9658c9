"""The worker extension (``worker_extension_cls``) through which :func:`uncertainty` fetches results:
``llm.collective_rpc("epikern_collect", args=(request_ids,))`` runs in the engine's worker process."""

from __future__ import annotations

from .runner_hooks import state_of


class UncertaintyExtension:
    """Mixed into vLLM's worker class by vLLM (``worker_extension_cls``)."""

    def epikern_collect(self, request_ids: list[str]) -> dict:
        """Pop the per-token EU fields of ``request_ids`` (user-facing ids) as nested lists."""
        return self.epikern_state().collect(request_ids)

    def epikern_held(self) -> dict:
        """What the hooks hold now: requests whose results wait to be collected, and the rows
        (requests) of the last step's kept proposal logits."""
        state = self.epikern_state()
        return {"requests_with_results": len(state.results),
                "proposal_rows": 0 if state.proposals is None else state.proposals.shape[1]}

    def epikern_state(self):
        state = state_of(self.model_runner)
        if state is None:
            raise RuntimeError("this engine does not score its tokens: its draft model is not an epikern draft "
                               "ensemble (start it with LLM(model=..., **ekv.engine_args(draft_dir))), or it runs "
                               "vLLM's V2 model runner, the GPU default, which is not hooked (set "
                               "VLLM_USE_V2_MODEL_RUNNER=0), or EPIKERN_VLLM_EU=0 was set")
        return state
