"""Engine logit layouts for ``ek.draft_uncertainty_rows`` tests, and the dense op as their oracle.

* ``vllm_v1``: target logits ``[num_draft_tokens + B, V]``, request-major, one bonus row after each
  request's draft rows; ``target_rows`` = vLLM's ``target_logits_indices`` (int32) padded to a
  fixed size with −1 (a CUDA-graph batch size); drafts ``[K, pad, V]`` row n ↔ output row n.
* ``vllm_v2``: drafts ``[K, max_reqs, γ, V]`` per request slot, ``draft_rows = slot·γ + j``
  (int64); target as in V1; padding rows −1 in one map only.
* ``sglang``: ``[B · draft_token_num, V]`` for drafts and target, identity maps; ``padded`` marks
  the last request's rows −1 through an int64 ``target_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import epikern as ek
from tests._cases import assert_close, make_logits

LAYOUTS = ("vllm_v1", "vllm_v2", "sglang", "sglang_padded")


@dataclass
class Layout:
    draft: torch.Tensor  #: [K, *rows, V]
    target: torch.Tensor  #: [*rows, V]
    draft_rows: Optional[torch.Tensor]
    target_rows: Optional[torch.Tensor]

    @property
    def n(self) -> int:
        for m in (self.draft_rows, self.target_rows):
            if m is not None:
                return m.shape[0]
        return self.target.reshape(-1, self.target.shape[-1]).shape[0]


def _request_major(num_draft: tuple[int, ...], pad_to: int) -> list[int]:
    """vLLM V1's target_logits_indices (bonus rows skipped), padded with −1."""
    rows, start = [], 0
    for g in num_draft:
        rows += range(start, start + g)
        start += g + 1
    return rows + [-1] * (pad_to - len(rows))


def make_layout(name: str, K: int, V: int, dtype: torch.dtype, seed: int = 0, device="cpu") -> Layout:
    g = torch.Generator().manual_seed(seed)

    def logits(*shape):
        return make_logits(shape, "masked" if seed % 2 else "normal", dtype, generator=g).to(device)

    if name == "vllm_v1":
        num_draft, pad = (3, 0, 2, 4), 12
        target = logits(sum(num_draft) + len(num_draft), V)
        rows = torch.tensor(_request_major(num_draft, pad), dtype=torch.int32, device=device)
        return Layout(logits(K, pad, V), target, None, rows)
    if name == "vllm_v2":
        max_reqs, gamma, slots, num_draft, pad = 6, 3, (4, 1, 3), (3, 2, 3), 10
        draft = logits(K, max_reqs, gamma, V)
        target = logits(sum(num_draft) + len(num_draft), V)
        d_rows = [s * gamma + j for s, n in zip(slots, num_draft) for j in range(n)]
        t_rows = _request_major(num_draft, pad)
        d_rows += [-1] * (pad - len(d_rows) - 1) + [0]  # the last padding row: −1 in target_rows only
        return Layout(draft, target, torch.tensor(d_rows, dtype=torch.int64, device=device),
                      torch.tensor(t_rows, dtype=torch.int64, device=device))
    batch, draft_token_num = 3, 4
    n = batch * draft_token_num
    draft, target = logits(K, n, V), logits(n, V)
    if name == "sglang":
        return Layout(draft, target, None, None)
    rows = torch.arange(n, device=device)
    rows[-draft_token_num:] = -1
    return Layout(draft, target, None, rows)


def dense_expected(layout: Layout, inv_t: torch.Tensor, backend: str, **kw):
    """``ek.draft_uncertainty`` on the gathered rows of the kept outputs, each scaled by its 1/T,
    and the keep mask: what every kept output row of the rows op must equal."""
    K, V = layout.draft.shape[0], layout.draft.shape[-1]
    draft = layout.draft.reshape(K, -1, V)
    target = layout.target.reshape(-1, V)
    n = torch.arange(layout.n, device=draft.device)
    d_idx = n if layout.draft_rows is None else layout.draft_rows.long()
    t_idx = n if layout.target_rows is None else layout.target_rows.long()
    keep = (d_idx >= 0) & (t_idx >= 0)
    scale = inv_t.float()[keep]
    d = draft[:, d_idx[keep]].float() * scale[None, :, None]
    t = target[t_idx[keep]].float() * scale[:, None]
    return ek.draft_uncertainty(d, t, backend=backend, **kw), keep


def assert_rows_match(out, expected, keep, atol=1e-4, rtol=1e-4) -> None:
    """Kept rows of ``out`` (a DraftUncertainty of the rows op) equal ``expected``; the rest NaN."""
    for name in out._fields:
        got = getattr(out, name)
        assert_close(name, got[..., keep], getattr(expected, name), atol, rtol)
        assert bool(got[..., ~keep].isnan().all()), f"{name}: padding rows must be NaN"
