"""The default and ``--quick`` recipes of the tiny pipeline (sized for a 2-core laptop CPU).

The defaults are the recipe dataclasses' own defaults (:mod:`epikern.training.config`); ``--quick``
shrinks steps, examples and responses and keeps every architecture but the target's depth: a
3-layer target instead of 6, with a larger learning rate to get anywhere in half the steps (about
10 % held-out accuracy; 6 layers trained as briefly reached 3.5 %, with drafts that accepted 0.41 of
their proposals at γ = 2, and ``epikern bench --quick`` took 7 min 9 s instead of 3 min 54 s on the
same 2 cores). ``--quick`` exists to exercise every stage in CI, not to measure.
"""

from __future__ import annotations

import dataclasses

from .config import DraftsRecipe, ProxyRecipe, TargetRecipe


def target(quick: bool = False) -> TargetRecipe:
    """``epikern train target`` [--quick]."""
    base = TargetRecipe()
    if not quick:
        return base
    return dataclasses.replace(base, model=dataclasses.replace(base.model, num_layers=3), train_problems=6000,
                               heldout_problems=200, response_prompts=96,
                               train=dataclasses.replace(base.train, steps=200, batch_size=24, lr=8e-3, warmup_steps=15))


def drafts(quick: bool = False) -> DraftsRecipe:
    """``epikern train drafts`` [--quick] (``target`` and ``--ddd`` are set by the caller)."""
    base = DraftsRecipe()
    if not quick:
        return base
    return dataclasses.replace(base, train=dataclasses.replace(base.train, steps=40, warmup_steps=4))


def embedded_drafts(quick: bool = False) -> DraftsRecipe:
    """The drafts of ``epikern bench``'s embedded pipeline: :func:`drafts` (the paper's recipe, which
    ``epikern train drafts`` keeps) with posterior-sample distillation from a teacher at σ = 0.2 (twice
    the ground truth's σ: the drafts' spread must stand above their capacity noise; 0.3 and 0.4
    overshoot) for 400 steps instead of 80: the best point at ≤ 30 % of TokUR's FLOPs per token and
    the paper's draft cost that ``epikern bench sweep`` measured (token Pearson with the ground truth
    0.40 against 0.17; benchmarks/RESULTS.md § Sweep). ``--quick`` keeps its 40 steps."""
    base = drafts(quick)
    steps = base.train.steps if quick else 400
    return dataclasses.replace(base, psd=True, sigma=0.2, train=dataclasses.replace(base.train, steps=steps))


def proxy(quick: bool = False) -> ProxyRecipe:
    """``epikern train proxy`` [--quick] (``target`` is set by the caller)."""
    base = ProxyRecipe()
    if not quick:
        return base
    return dataclasses.replace(base, train=dataclasses.replace(base.train, steps=20, warmup_steps=2))
