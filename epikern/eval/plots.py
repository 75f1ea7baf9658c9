"""PNG plots of the benchmark report (design §6): EU traces, ROC curves, the cost–quality plane,
speculative decoding's speed per γ.

Each function writes one PNG with matplotlib's Agg backend (no display needed) and returns its path.
"""

from __future__ import annotations

from ..extras import require

require("eval", __name__)

import math
import os
from typing import Mapping, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg", force=False)  # headless; a backend the caller already chose is kept
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

__all__ = ["eu_traces", "roc_curves", "cost_quality", "speculative_speedup"]

#: At most this many tokens get their text as x tick labels; longer responses get index ticks.
MAX_TOKEN_LABELS = 80
DPI = 120


def _save(fig: Figure, path: Union[str, os.PathLike]) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _token_label(text: str) -> str:
    """A token as a tick label: visible whitespace, newlines as ↵, at most 12 characters."""
    label = text.replace("\n", "↵").replace("\t", "⇥").replace(" ", "␣") or "∅"
    return label if len(label) <= 12 else label[:11] + "…"


def eu_traces(path, tokens_text: Union[Sequence[str], Sequence[Sequence[str]]],
              series: Mapping[str, Union[np.ndarray, Sequence[np.ndarray]]],
              title: str = "Per-token epistemic uncertainty", ylabel: str = "EU (nats)") -> str:
    """Per-token uncertainty along one or a few responses, one line per estimator.

    Args:
        path: the PNG to write.
        tokens_text: the response's tokens as text (``[T]``), or one such list per response
            (``[R][T_r]``; one panel per response, stacked).
        series: estimator name → per-token values (``[T]``, or ``R`` arrays ``[T_r]``), e.g.
            ``{"drafts (DDD)": eu, "TokUR": mi, "ground truth": gt}``; NaN values leave a gap.
        title: figure title; ylabel: the y axis label with its unit.

    Tokens are the x tick labels (rotated, whitespace made visible) when a response has at most
    :data:`MAX_TOKEN_LABELS` of them; longer ones are indexed by position.
    """
    if not series:
        raise ValueError("series is empty")
    single = len(tokens_text) == 0 or isinstance(tokens_text[0], str)
    responses = [list(tokens_text)] if single else [list(t) for t in tokens_text]
    curves = {}
    for name, values in series.items():
        values = [values] if single else list(values)
        if len(values) != len(responses):
            raise ValueError(f"series {name!r} has {len(values)} responses, tokens_text has {len(responses)}")
        curves[name] = [np.asarray(v, dtype=np.float64) for v in values]
        for r, (v, toks) in enumerate(zip(curves[name], responses)):
            if v.shape != (len(toks),):
                raise ValueError(f"series {name!r} response {r} has shape {v.shape} for {len(toks)} tokens")
    # room for each token label; responses with index ticks only widen up to 16 inches
    width = max(8.0, *(0.16 * len(t) + 2 if len(t) <= MAX_TOKEN_LABELS else min(16.0, 0.05 * len(t) + 4)
                       for t in responses))
    fig, axes = plt.subplots(len(responses), 1, figsize=(width, 3.2 * len(responses)), squeeze=False,
                             constrained_layout=True)
    styles = ["-", "--", "-.", ":"]
    for r, (ax, toks) in enumerate(zip(axes[:, 0], responses)):
        x = np.arange(len(toks))
        for j, (name, values) in enumerate(curves.items()):
            ax.plot(x, values[r], styles[j % len(styles)], marker="o", markersize=2.5, linewidth=1.4,
                    label=name)
        if len(toks) <= MAX_TOKEN_LABELS:
            ax.set_xticks(x)
            ax.set_xticklabels([_token_label(t) for t in toks], rotation=90, fontsize=7, family="monospace")
            ax.set_xlabel("generated token")
        else:
            ax.set_xlabel("generated token (position)")
        ax.set_xlim(-0.5, max(len(toks) - 0.5, 0.5))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(responses) > 1:
            ax.set_title(f"response {r + 1}", fontsize=10, loc="left")
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=9, frameon=False)
    fig.suptitle(title)
    return _save(fig, path)


def roc_curves(path, curves: Mapping[str, tuple], title: str = "Hallucination detection: ROC curves"
               ) -> str:
    """ROC curves of wrong-answer detection, one per method, with the chance diagonal.

    Args:
        curves: method name → ``(fpr, tpr, auroc)`` (:func:`epikern.eval.metrics.roc_points`).
            The legend lists methods by decreasing AUROC.
    """
    if not curves:
        raise ValueError("curves is empty")
    fig, ax = plt.subplots(figsize=(6.4, 6.0))
    ranked = sorted(curves.items(), key=lambda kv: -kv[1][2] if np.isfinite(kv[1][2]) else math.inf)
    cmap = plt.get_cmap("tab10")
    for i, (name, (fpr, tpr, auc)) in enumerate(ranked):
        fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
        if fpr.shape != tpr.shape or fpr.ndim != 1:
            raise ValueError(f"curve {name!r}: fpr {fpr.shape} and tpr {tpr.shape} must be equal 1-D")
        # straight segments between roc_curve's points: a diagonal is a group of tied scores
        ax.plot(fpr, tpr, color=cmap(i % 10), linestyle="-" if i < 10 else "--", linewidth=1.6,
                label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.5", linestyle=":", linewidth=1, label="chance (0.500)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (correct answers flagged)")
    ax.set_ylabel("true positive rate (wrong answers flagged)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _place_labels(fig: Figure, texts, marker_radius_pt: float = 4.5, obstacles=()) -> None:
    """Move each point label (an offset-points ``Annotation``) to the nearest free spot: inside its
    axes, clear of every labelled point's marker, of the labels placed before it and of
    ``obstacles`` (other texts, e.g. a corner note). Boxes in display space; leader lines not
    included; markers as squares of ``marker_radius_pt``.

    Candidates are the label's own offset shifted up or down by up to 120 points, then also further
    right, nearest first; labels are placed from the lowest point up. A label with no free spot
    keeps the candidate that overlaps least.
    """
    renderer = fig.canvas.get_renderer()

    def box(t):  # the text alone: an Annotation's own extent includes its leader line
        return Text.get_window_extent(t, renderer)

    r = marker_radius_pt * fig.dpi / 72
    anchors = (t.axes.transData.transform(t.xy) for t in texts)
    placed = [Bbox.from_extents(x - r, y - r, x + r, y + r) for x, y in anchors]
    placed += [box(o) for o in obstacles]
    shifts = sorted(((dx, dy) for dx in (0, 40, 80) for dy in range(-120, 121, 3)),
                    key=lambda s: (abs(s[1]) + s[0], s[1] < 0))
    for text in sorted(texts, key=lambda t: t.xy[1]):
        area = text.axes.get_window_extent(renderer)
        x0, y0 = text.get_position()
        best, fewest = (x0, y0), None
        for dx, dy in shifts:
            text.set_position((x0 + dx, y0 + dy))
            mine = box(text)
            outside = mine.x0 < area.x0 or mine.x1 > area.x1 or mine.y0 < area.y0 or mine.y1 > area.y1
            clashes = sum(mine.expanded(1.02, 1.1).overlaps(b) for b in placed) + 2 * outside
            if clashes == 0:
                best = None
                break
            if fewest is None or clashes < fewest:
                best, fewest = (x0 + dx, y0 + dy), clashes
        if best is not None:
            text.set_position(best)
        placed.append(box(text))


def cost_quality(path, points: Mapping[str, tuple], title: str = "Cost vs quality of uncertainty estimators",
                 reference: Optional[str] = "tokur", ylabel: str = "hallucination-detection AUROC",
                 xlabel: str = "inference FLOPs per generated token (log scale)") -> str:
    """The cost–quality plane: FLOPs per token (log x) against AUROC, one labelled point per method.

    Args:
        points: method name → ``(flops_per_token, auroc)``. Points with a missing (None/NaN) or
            non-positive FLOP count or a missing AUROC cannot be placed: they are listed under the
            axes instead of silently dropped.
        reference: a method whose FLOPs the labels are expressed against (``0.12× tokur``); None
            for plain labels. Ignored if that method has no FLOP count.
        title, ylabel, xlabel: texts (the y label names the AUROC that is plotted).

    Upper left is better: cheaper and more accurate. A dotted line marks chance (AUROC 0.5).
    """
    if not points:
        raise ValueError("points is empty")

    def ok(v):
        return v is not None and np.isfinite(v)

    good = {n: (float(f), float(a)) for n, (f, a) in points.items() if ok(f) and f > 0 and ok(a)}
    missing = sorted(set(points) - set(good))
    ref = good.get(reference, (None,))[0] if reference else None
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    cmap = plt.get_cmap("tab10")
    texts = []
    for i, (name, (flops, auc)) in enumerate(sorted(good.items(), key=lambda kv: kv[1][0])):
        is_ref = name == reference
        color = "black" if is_ref else cmap(i % 10)
        ax.scatter([flops], [auc], s=70 if is_ref else 45, marker="s" if is_ref else "o",
                   color=color, edgecolor="black", linewidth=0.6, zorder=3)
        label = name if ref is None or is_ref else f"{name} ({flops / ref:.2g}× {reference})"
        texts.append(ax.annotate(label, (flops, auc), xytext=(8, 5), textcoords="offset points",
                                 fontsize=8.5, zorder=4, va="center", color=color,
                                 arrowprops=dict(arrowstyle="-", color=color, linewidth=0.7,
                                                 relpos=(0.0, 0.5), shrinkA=1, shrinkB=4)))
    ax.set_xscale("log")
    if good:
        fl = [f for f, _ in good.values()]
        lo, hi = min(fl), max(fl)
        ax.set_xlim(lo / 2, hi * 6)  # room on the right for the labels
        aucs = [a for _, a in good.values()]
        ax.set_ylim(min(0.45, min(aucs) - 0.03), min(1.0, max(aucs) + 0.06) + 0.02)
    ax.axhline(0.5, color="0.5", linestyle=":", linewidth=1)
    # bottom left, where no estimator worth plotting lies, leaving the top to the point labels
    note = ax.text(0.01, 0.01, "↖ cheaper and more accurate", transform=ax.transAxes, ha="left", va="bottom",
                   fontsize=8, color="0.4")
    chance = ax.text(1.0, 0.5, "chance ", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
                     fontsize=8, color="0.4")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if missing:
        ax.text(0.0, -0.14, "not plotted (no FLOP count or AUROC): " + ", ".join(missing),
                transform=ax.transAxes, fontsize=8, color="0.3", va="top")
    fig.draw_without_rendering()  # text extents for the label placement
    _place_labels(fig, texts, obstacles=[note, chance])
    return _save(fig, path)


def speculative_speedup(path, rows: Sequence[Mapping], title: str = "Speculative decoding: speed per γ",
                        baseline: str = "hf") -> str:
    """Speed over plain decoding (left) and tokens emitted per target forward (right) against γ.

    Args:
        rows: :meth:`epikern.eval.speculative_measure.VariantRow.to_json` dicts (``variant``,
            ``gamma`` — 0 for the variants without rounds —, ``eu``, ``speedup`` over ``baseline`` and,
            for epikern's decoders, ``tokens_per_round``). Variants with γ > 0 become lines; those with
            γ = 0 (``plain``, ``plain+EU``) horizontal references, as does ``baseline`` at 1×.
        baseline: the variant the speedups are relative to.

    Above the 1× line speculative decoding beats plain decoding; the right panel shows why a line
    rises or falls (tokens a round against the γ + 1 it could emit at most).
    """
    per_gamma: dict = {}
    flat = {}
    for r in rows:
        if r.get("speedup") is None or not np.isfinite(r["speedup"]):
            continue
        if r.get("gamma"):
            per_gamma.setdefault((r["variant"], bool(r.get("eu"))), []).append(
                (r["gamma"], r["speedup"], r.get("tokens_per_round")))
        else:
            flat[r["variant"]] = r["speedup"]
    if not per_gamma:
        raise ValueError("no rows with γ > 0 and a speedup")
    fig, (ax, ax_tokens) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    cmap = plt.get_cmap("tab10")
    gammas = sorted({g for points in per_gamma.values() for g, _, _ in points})
    for i, ((name, eu), points) in enumerate(per_gamma.items()):
        points.sort()
        g, speed, tokens = zip(*points)
        style = dict(color=cmap(i % 10), marker="o", linewidth=1.6, linestyle="--" if eu else "-")
        ax.plot(g, speed, label=name, **style)
        if all(t is not None for t in tokens):
            ax_tokens.plot(g, tokens, **style)  # colours as in the left legend
    ax.axhline(1.0, color="black", linewidth=1, label=f"{baseline} (1×)")
    for j, (name, speed) in enumerate(flat.items()):
        if name != baseline:
            ax.axhline(speed, color=f"{0.3 + 0.25 * (j % 2)}", linestyle=(0, (1, 1.5 + j)), linewidth=1.2,
                       label=f"{name}, γ = 0 ({speed:.2f}×)")
    ax_tokens.plot(gammas, [g + 1 for g in gammas], color="0.5", linestyle=":", linewidth=1, label="γ + 1 (all accepted)")
    for a in (ax, ax_tokens):
        a.set_xscale("log", base=2)
        a.set_xticks(gammas, [str(g) for g in gammas])
        a.minorticks_off()
        a.set_xlabel("γ (proposals a round, at most)")
        a.grid(alpha=0.3)
    ax.margins(y=0.08)
    ax.set_ylabel(f"tokens/s ÷ {baseline}'s")
    ax_tokens.set_ylabel("tokens per target forward")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax_tokens.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
