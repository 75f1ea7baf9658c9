"""Wrappers of vLLM's V1 model runner that score every emitted token with the fused EU op.

Where the numbers come from, in one engine step of a request that verified ``n`` of its proposals
and so emits ``m = n + 1`` tokens ``e_0 .. e_n`` (a prefill emits ``m = 1``, a partial prefill 0):

* the target's distribution of ``e_j`` is row ``j`` of the request's ``n_draft + 1`` verification
  logits in ``GPUModelRunner._sample`` (request-major, bonus row last; one row without speculation);
* the drafts' distribution of ``e_j`` is the one the previous step's draft step ``j`` computed
  at the same prefix (it proposed ``d_{j+1}``, accepted for ``j < n``, rejected for ``j = n``): row
  ``j`` of the ``[K, γ, V]`` logits the ensemble made for this request in that ``propose`` (kept,
  one step only, in :attr:`EUState.proposals`);
* where that step did not reach — ``j = γ`` after a fully accepted round (the bonus token), or a
  request's first token — it comes from this step's first draft pass, which re-reads the accepted
  tokens: its row just before the slot of the new token (``token_indices_to_sample − 1`` of
  ``set_inputs_first_pass``).

So no draft or target forward is added; the cost is one ``[K, H]×[H, V]`` LM-head row per request
that took a bonus token or is new, and at most two fused :func:`epikern.draft_uncertainty_rows`
calls a step, which read the target's verification rows and the kept proposals in place through
row maps. Memory: the proposals of the last step only
(``K·γ·V`` floats per live request), replaced every step; the per-token results of a request are
kept until :func:`epikern.integrations.vllm.uncertainty` collects them.

The hooks are installed on the classes once (by the plugin, in every vLLM process) and do nothing
but one cached ``getattr`` for engines whose draft model is not the epikern ensemble.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from ... import DraftUncertainty, draft_uncertainty_rows
from . import cpu_fix
from .model import DraftEnsembleForCausalLM

STATE_ATTR = "epikern_eu_state"
EU_SWITCH = "EPIKERN_VLLM_EU"
PLACEHOLDER_TOKEN = -1  # vLLM's marker for rejected positions in sampled_token_ids


class EUState:
    """What one model runner keeps between its sample and propose steps (see the module docstring)."""

    def __init__(self, model: DraftEnsembleForCausalLM):
        self.model = model
        self.step: Optional[tuple] = None
        self.proposals: Optional[Tensor] = None  #: [K, B_prev, γ, V] logits of the last propose
        self.proposal_index: dict[str, int] = {}  #: request id -> row of ``proposals``
        self.results: dict[str, list[DraftUncertainty]] = {}  #: request id -> per-step chunks

    def score(self) -> None:
        """EU of every token the recorded step emitted; keep this step's proposals for the next."""
        req_ids, logits, spec, sampled, discard = self.step
        self.step = None
        model, record = self.model, model_record(self.model)
        B = len(req_ids)
        counts = (sampled[:B] != PLACEHOLDER_TOKEN).sum(dim=1).cpu()
        counts[torch.from_numpy(discard)] = 0
        N = int(counts.sum())
        if N:
            req = torch.repeat_interleave(torch.arange(B), counts)
            j = torch.arange(N) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
            if spec is None:
                starts = torch.arange(B)
            else:
                starts = spec.cu_num_sampled_tokens.cpu().long() - torch.tensor(spec.num_draft_tokens) - 1
            device = logits.device
            target_rows = (starts[req] + j).to(device)
            # token j of a request was drawn at the prefix where the previous step's draft step j
            # proposed (kept rows); only where that step did not reach (j = γ: all accepted; a new
            # request) does it take the first pass's row, whose K LM-head rows are computed here
            gamma = 0 if self.proposals is None else self.proposals.shape[2]
            prev = torch.tensor([self.proposal_index.get(rid, -1) for rid in req_ids])[req]
            kept = (prev >= 0) & (j < gamma)
            fresh = ~kept
            parts = []
            if bool(fresh.any()):
                parts.append((fresh, model.draft_logits(model.captured[req[fresh].to(device)]), None))
            if bool(kept.any()):
                parts.append((kept, self.proposals, (prev[kept] * gamma + j[kept]).to(device)))
            u = self._score_rows(parts, logits, target_rows, N)
            self._append(req_ids, counts, u)
        model.captured = None
        self.proposals = torch.stack(record, dim=2) if record else None
        # a request whose sampled token was discarded (partial prefill) proposed from a wrong prefix
        self.proposal_index = {rid: i for i, rid in enumerate(req_ids) if counts[i] > 0}

    def _score_rows(self, parts, logits: Tensor, target_rows: Tensor, N: int) -> DraftUncertainty:
        """One fused :func:`epikern.draft_uncertainty_rows` call per draft source (``(mask over the N
        tokens, draft logits [K, *rows, V], draft row map or None)``), reading the target's rows in
        place; the fields put back in token order."""
        fields = None
        for mask, drafts, draft_rows in parts:
            where = mask.to(logits.device)
            u = draft_uncertainty_rows(drafts, logits, draft_rows=draft_rows, target_rows=target_rows[where],
                                       weights=self.model.weights)
            if fields is None:
                fields = [f.new_empty(*f.shape[:-1], N) for f in u]
            for field, part in zip(fields, u):
                field[..., where] = part
        return DraftUncertainty(*fields)

    def _append(self, req_ids: list, counts: Tensor, u: DraftUncertainty) -> None:
        sizes = counts.tolist()
        per_field = [torch.split(f, sizes, dim=-1) for f in u]
        for i, rid in enumerate(req_ids):
            if sizes[i]:
                self.results.setdefault(rid, []).append(DraftUncertainty(*(f[i] for f in per_field)))

    def collect(self, request_ids: list[str]) -> dict[str, dict[str, list]]:
        """Pop the per-token fields of the requests whose user-facing id is in ``request_ids``
        (vLLM's internal id is ``<user id>-<suffix>``), as nested lists (what every RPC serialiser
        carries unchanged)."""
        wanted = set(request_ids)
        found = {}
        for internal in [rid for rid in self.results if rid.rsplit("-", 1)[0] in wanted]:
            chunks = self.results.pop(internal)
            fields = DraftUncertainty(*(torch.cat(f, dim=-1) for f in zip(*chunks)))
            found[internal.rsplit("-", 1)[0]] = {k: v.tolist() for k, v in fields._asdict().items()}
        return found


def model_record(model: DraftEnsembleForCausalLM) -> list[Tensor]:
    record, model.record = model.record or [], None
    return record


def state_of(runner) -> Optional[EUState]:
    """The runner's :class:`EUState`, or None if its draft model is not the epikern ensemble (or
    ``EPIKERN_VLLM_EU=0`` was set when the engine started: the drafts then propose without scoring,
    the baseline of the overhead benchmark)."""
    state = runner.__dict__.get(STATE_ATTR, False)
    if state is False:
        model = getattr(getattr(runner, "drafter", None), "model", None)
        scoring = isinstance(model, DraftEnsembleForCausalLM) and os.environ.get(EU_SWITCH, "1") != "0"
        state = EUState(model) if scoring else None
        if state is not None:
            cpu_fix.install()  # here, after the worker registered vLLM's CPU kernel overrides
        setattr(runner, STATE_ATTR, state)
    return state


def _wrap_sample(original):
    @functools.wraps(original)
    def _sample(self, logits, spec_decode_metadata):
        state = state_of(self)
        if state is None or logits is None:
            return original(self, logits, spec_decode_metadata)
        # the sampler may scale logits in place when sampling: keep the raw rows for the EU
        kept = logits if self.input_batch.sampling_metadata.all_greedy else logits.clone()
        out = original(self, logits, spec_decode_metadata)
        num_reqs = self.input_batch.num_reqs
        state.step = (list(self.input_batch.req_ids), kept, spec_decode_metadata, out.sampled_token_ids,
                      self.discard_request_mask.np[:num_reqs].astype(bool))
        return out
    return _sample


def _wrap_propose(original):
    @functools.wraps(original)
    def propose_draft_token_ids(self, *args, **kwargs):
        state = state_of(self)
        if state is None or state.step is None:
            return original(self, *args, **kwargs)
        state.model.record = []
        try:
            out = original(self, *args, **kwargs)
        except BaseException:
            state.model.record, state.model.score_rows, state.step = None, None, None
            raise
        state.score()
        return out
    return propose_draft_token_ids


def _wrap_first_pass(original):
    @functools.wraps(original)
    def set_inputs_first_pass(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if isinstance(self.model, DraftEnsembleForCausalLM) and self.model.record is not None:
            self.model.score_rows = out[1] - 1  # the slot before each request's new token
        return out
    return set_inputs_first_pass


def install() -> None:
    """Wrap ``GPUModelRunner._sample``/``propose_draft_token_ids`` and the draft-model proposer's
    ``set_inputs_first_pass`` (once per process)."""
    from vllm.v1.spec_decode.draft_model import DraftModelProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "epikern_hooked", False):
        return
    GPUModelRunner._sample = _wrap_sample(GPUModelRunner._sample)
    GPUModelRunner.propose_draft_token_ids = _wrap_propose(GPUModelRunner.propose_draft_token_ids)
    DraftModelProposer.set_inputs_first_pass = _wrap_first_pass(DraftModelProposer.set_inputs_first_pass)
    GPUModelRunner.epikern_hooked = True
