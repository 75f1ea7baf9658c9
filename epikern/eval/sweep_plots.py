"""PNG plots of ``epikern bench sweep`` (matplotlib, Agg): quality against cost with the Pareto front
and the oracle drafts' curve over K, and the jsd/kl split of every point.

    plot_sweep(out, sweep) -> {"title": "relative/path.png", ...}
"""

from __future__ import annotations

from ..extras import require

require("eval", __name__)

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg", force=False)  # headless; a backend the caller already chose is kept
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["pareto_front", "plot_sweep"]

#: metric → (axis label, True if higher is better)
QUALITY = {"rmse": ("token RMSE to the ground truth (nats, log)", False),
           "pearson": ("token Pearson with the ground truth", True),
           "auroc_lr": ("hallucination AUROC (logistic regression)", True)}
REFERENCE_STYLE = {"tokur": ("TokUR (M=10)", "black", "--"), "entropy": ("target entropy", "tab:green", ":"),
                   "oracle_drafts": ("oracle drafts", "tab:purple", "-.")}
GROUP_MARKERS = {"steps": "o", "capacity": "s", "diversity": "^", "variants": "D", "sigma": "v"}


def pareto_front(cost: Sequence[float], quality: Sequence[float], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (cost ≤ and quality ≥, one of them
    strictly), ordered by cost; NaN points are never on the front."""
    q = np.asarray(quality, dtype=float) * (1 if higher_is_better else -1)
    c = np.asarray(cost, dtype=float)
    ok = np.isfinite(q) & np.isfinite(c)
    front = [i for i in np.flatnonzero(ok)
             if not np.any(ok & (c <= c[i]) & (q >= q[i]) & ((c < c[i]) | (q > q[i])))]
    return sorted(front, key=lambda i: (c[i], -q[i]))


def _quality_plot(path: Path, rows: list[Mapping], references: Mapping, metric: str,
                  oracle_by_k: Optional[Mapping] = None) -> str:
    label, higher = QUALITY[metric]
    cost = [r.get("flops_vs_tokur", np.nan) for r in rows]
    values = [np.nan if r.get(metric) is None else r[metric] for r in rows]
    front = pareto_front(cost, values, higher)
    fig, ax = plt.subplots(figsize=(9.5, 6.5))
    for group, marker in GROUP_MARKERS.items():
        idx = [i for i, r in enumerate(rows) if r["group"] == group]
        if idx:
            ax.scatter([cost[i] for i in idx], [values[i] for i in idx], marker=marker, s=40, label=group,
                       alpha=0.85, zorder=3)
    ax.plot([cost[i] for i in front], [values[i] for i in front], color="tab:red", linewidth=1.2, zorder=2,
            label="Pareto front")
    for name, (text, color, style) in REFERENCE_STYLE.items():
        value = references.get(name, {}).get(metric)
        if value is not None and np.isfinite(value):
            ax.axhline(value, color=color, linestyle=style, linewidth=1.1, label=f"{text}: {value:.3g}")
    oracle_by_k = oracle_by_k or {}
    ks = [k for k, o in sorted(oracle_by_k.items(), key=lambda item: int(item[0]))  # JSON sorts "16" < "2"
          if o.get(metric) is not None and np.isfinite(o[metric])]
    if ks:  # the ceiling of K drafts: K posterior samples of the ground truth's own family
        ax.plot([oracle_by_k[k]["flops_vs_tokur"] for k in ks], [oracle_by_k[k][metric] for k in ks],
                color="tab:purple", marker="x", linewidth=1, label=f"oracle drafts, K = {ks[0]}…{ks[-1]}")
        for k in ks:
            ax.annotate(f"K={k}", (oracle_by_k[k]["flops_vs_tokur"], oracle_by_k[k][metric]), xytext=(3, -9),
                        textcoords="offset points", fontsize=6.5, color="tab:purple")
    ceiling = references.get("ground_truth", {}).get("split_half_pearson")
    if metric == "pearson" and ceiling is not None:
        ax.axhline(ceiling, color="0.3", linestyle="-", linewidth=0.8,
                   label=f"ground truth's split-half ceiling: {ceiling:.3g}")
    ax.axvline(0.3, color="0.6", linestyle=":", linewidth=1, label="30 % of TokUR's FLOPs")
    ax.set_xscale("log")
    if metric == "rmse":
        ax.set_yscale("log")
    ax.set_xlabel("FLOPs per token ÷ TokUR's (log)")
    ax.set_ylabel(label)
    ax.set_title(f"Sweep: {metric} against cost ({'higher' if higher else 'lower'} is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _name_points(ax, cost, values, [r["name"] for r in rows], front)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return os.fspath(path)


def _name_points(ax, cost: Sequence[float], values: Sequence[float], names: Sequence[str], front: Sequence[int]):
    """Label every point; the labels of points at one cost (many recipes share an architecture) are
    stacked 9 px apart in the points' order and centred on them, with a leader line when moved."""
    ax.figure.canvas.draw()  # fixes the limits: data → pixels is final from here
    points_per_px = 72 / ax.figure.dpi
    columns: dict[float, list[int]] = {}
    for i, (c, v) in enumerate(zip(cost, values)):
        if np.isfinite(c) and np.isfinite(v):
            columns.setdefault(round(float(np.log10(c)), 2), []).append(i)
    for column in columns.values():
        order = sorted(column, key=lambda i: -values[i])
        at = np.array([ax.transData.transform((cost[i], values[i]))[1] for i in order])  # pixel y grows upwards
        y = at.copy()
        for j in range(1, len(y)):
            y[j] = min(y[j], y[j - 1] - 9)
        y += np.mean(at) - np.mean(y)  # the stack centred on its points, not hanging below the top one
        for i, py, ly in zip(order, at, y):
            on = i in front
            ax.annotate(names[i], (cost[i], values[i]), xytext=(9, (ly - py) * points_per_px),
                        textcoords="offset points", va="center", fontsize=7.5 if on else 6,
                        color="tab:red" if on else "0.35",
                        arrowprops=dict(arrowstyle="-", color="0.7", linewidth=0.5) if abs(py - ly) > 6 else None)


def _split_plot(path: Path, rows: list[Mapping], truth_mean: float) -> str:
    names = [r["name"] for r in rows]
    jsd = np.array([r.get("jsd_mean", np.nan) for r in rows], dtype=float)
    kl = np.array([r.get("kl_mean", np.nan) for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.42 * len(rows) + 2), 4.8))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, jsd, width=0.4, color="tab:blue", label="jsd among the drafts (variance term)")
    ax.bar(x + 0.2, kl, width=0.4, color="tab:orange", label="kl = KL(q̄ ‖ p) (bias term: capacity gap)")
    if np.isfinite(truth_mean):
        ax.axhline(truth_mean, color="black", linestyle="--", linewidth=1,
                   label=f"ground-truth EU mean: {truth_mean:.3g}")
    ax.set_yscale("log")
    top = np.nanmax(np.concatenate([jsd, kl, [truth_mean]]))
    ax.set_ylim(bottom=top * 1e-5)  # one draft's jsd is 0 up to round-off: keep the axis on the others
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("token mean (nats, log)")
    ax.set_title("Sweep: eu = jsd + kl per point")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(1.0, 0.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return os.fspath(path)


def plot_sweep(out, sweep: Mapping) -> dict[str, str]:
    """The sweep's plots in ``out`` (σ = 0.1 points against the σ = 0.1 references); title → path
    relative to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in sweep["points"] if r.get("flops_vs_tokur") is not None and r["sigma"] == 0.1]
    references = sweep["references"].get("0.1", {})
    plotted = {}
    if rows:
        for metric in QUALITY:
            plotted[f"Sweep: {metric} against FLOPs ÷ TokUR"] = _quality_plot(
                out / f"sweep_{metric}.png", rows, references, metric, sweep.get("oracle_by_k"))
        truth_mean = references.get("ground_truth", {}).get("mean", np.nan)
        plotted["Sweep: jsd/kl split per point"] = _split_plot(out / "sweep_split.png", rows, truth_mean)
    return {title: os.path.relpath(path, out) for title, path in plotted.items()}
