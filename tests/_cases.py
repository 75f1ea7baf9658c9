"""Shared inputs and comparisons for the design §8 test matrix (every backend uses these).

``make_logits`` draws fresh random logits of one of the design §8 kinds; ``reference_stats`` runs the
float64 oracle on exactly the values a kernel sees (low-precision inputs are upcast, never
re-drawn); ``assert_close_stats`` compares with |out − ref| ≤ atol + rtol·|ref| and requires NaN and
±inf in the same places.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from epikern.backends import reference
from epikern.backends.reference import STATS

ATOL = 1e-4
RTOL = 1e-4

KINDS = ("normal", "peaked", "flat", "masked")


def make_logits(
    shape: Sequence[int],
    kind: str = "normal",
    dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
    device: str = "cpu",
) -> torch.Tensor:
    """Random logits of ``shape``.

    kinds: ``normal`` (σ=1), ``peaked`` (σ=5 plus Gumbel noise: near one-hot rows), ``flat``
    (σ=1e-3: near uniform), ``masked`` (σ=2 with ~30% of entries −inf, never a whole row).
    """
    g = generator
    if kind == "normal":
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    elif kind == "peaked":
        u = torch.rand(shape, generator=g, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
        x = 5 * torch.randn(shape, generator=g, dtype=torch.float64) - torch.log(-torch.log(u))
    elif kind == "flat":
        x = 1e-3 * torch.randn(shape, generator=g, dtype=torch.float64)
    elif kind == "masked":
        x = 2 * torch.randn(shape, generator=g, dtype=torch.float64)
        mask = torch.rand(shape, generator=g) < 0.3
        mask[..., 0] = False  # keep every row a distribution
        x = x.masked_fill(mask, float("-inf"))
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return x.to(dtype=dtype, device=device)


def reference_stats(
    draft: torch.Tensor,
    target: Optional[torch.Tensor],
    weights: Optional[Sequence[float]] = None,
    temperature: float = 1.0,
    decompose: bool = True,
) -> dict[str, torch.Tensor]:
    """float64 oracle on the same values (``[K, *batch, V]`` drafts), as a name → tensor dict."""
    K, *batch, V = draft.shape
    w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.tensor(
        list(weights), dtype=torch.float64)
    d = draft.detach().cpu().double().reshape(K, -1, V)
    t = None if target is None else target.detach().cpu().double().reshape(-1, V)
    stats, draft_lse, target_lse = reference.draft_uncertainty(d, t, w, temperature, decompose)
    out = {name: stats[i].reshape(batch) for i, name in enumerate(STATS)}
    out["draft_lse"] = draft_lse.reshape(K, *batch)
    out["target_lse"] = target_lse.reshape(batch)
    return out


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor,
                 atol: float = ATOL, rtol: float = RTOL) -> None:
    out = out.detach().cpu().double()
    ref = ref.detach().cpu().double()
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    nan_o, nan_r = out.isnan(), ref.isnan()
    assert torch.equal(nan_o, nan_r), f"{name}: NaN positions differ\nout={out}\nref={ref}"
    inf_o, inf_r = out.isinf(), ref.isinf()
    assert torch.equal(inf_o, inf_r) and torch.equal(out[inf_o], ref[inf_r]), (
        f"{name}: ±inf positions differ\nout={out}\nref={ref}")
    finite = ~(nan_r | inf_r)
    err = (out[finite] - ref[finite]).abs()
    bound = atol + rtol * ref[finite].abs()
    if err.numel():
        worst = int((err - bound).argmax())
        assert bool((err <= bound).all()), (
            f"{name}: |out - ref| = {err[worst].item():.3g} > {bound[worst].item():.3g} "
            f"(out={out[finite][worst].item()!r}, ref={ref[finite][worst].item()!r})")


def assert_close_stats(result, ref: dict[str, torch.Tensor], atol: float = ATOL,
                       rtol: float = RTOL) -> None:
    """Compare a :class:`epikern.DraftUncertainty` against :func:`reference_stats`."""
    for name, expected in ref.items():
        assert_close(name, getattr(result, name), expected, atol, rtol)


def special_rows(V: int = 500, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Drafts ``[2, 4, V]`` and target ``[4, V]`` whose rows hit the edge cases of design §1.

    Row 0: p rules out a token the drafts give mass (kl = eu = +inf). Row 1: one-hot drafts on a
    token p rules out (+inf, and draft entropy exactly 0). Row 2: one NaN logit (NaN in that row
    only). Row 3: fully masked drafts (no distribution: NaN).
    """
    g = torch.Generator().manual_seed(seed)
    draft = make_logits((2, 4, V), "normal", generator=g)
    target = make_logits((4, V), "normal", generator=g)
    target[0, 7] = float("-inf")
    draft[:, 1, :] = float("-inf")
    draft[:, 1, 3] = 0.0
    target[1, 3] = float("-inf")
    draft[1, 2, 11] = float("nan")
    draft[:, 3, :] = float("-inf")
    return draft, target


def masked_spread_rows(spread: float, K: int = 2, N: int = 3, V: int = 5000, seed: int = 0,
                       mass_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``draft [K, N, V]``, ``target [N, V]`` (float32) with a ``spread``-nat logit range and a masked
    reference: every draft has logit 0 at one entry where the target is −inf (so eu = kl = +inf),
    and ``spread`` at another, in a later block (``mass_first``) or an earlier one; the rest
    ~ N(0, 1). Past ~87 (device) or ~104 nats (any fp32 exp) the mass entry's e^{x − max}
    underflows, yet its cross term must stay +inf."""
    g = torch.Generator().manual_seed(seed)
    draft = torch.randn(K, N, V, generator=g)
    target = torch.randn(N, V, generator=g)
    mass, peak = (1, V - 2) if mass_first else (V - 2, 1)
    draft[:, :, mass] = 0.0
    target[:, mass] = float("-inf")
    draft[:, :, peak] = spread
    return draft, target


def assert_special_rows(out) -> None:
    """The verdicts of :func:`special_rows` beyond matching the reference."""
    inf = float("inf")
    assert out.eu[0] == inf and out.kl[0] == inf and out.eu[1] == inf
    assert out.eu[2].isnan() and out.eu[3].isnan()
    assert out.draft_entropy[1] == 0  # one-hot: 0·log 0 = 0, no NaN
