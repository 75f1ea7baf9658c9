"""epikern.eval.plots: each plot writes a non-empty PNG of a sensible size and checks its input."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib import image as mpimg
from matplotlib.text import Text

from epikern.eval import metrics, plots


def _png(path) -> np.ndarray:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # not a blank canvas
    return img


def test_eu_traces_one_and_several_responses(tmp_path):
    rng = np.random.default_rng(0)
    tokens = list("3+5=8\n#### 8")
    series = {"drafts": rng.random(len(tokens)), "TokUR": rng.random(len(tokens)),
              "ground truth": np.r_[rng.random(len(tokens) - 1), np.nan]}
    path = plots.eu_traces(tmp_path / "one.png", tokens, series, title="EU")
    assert path == str(tmp_path / "one.png")
    _png(path)
    many = [tokens, [f"t{i}" for i in range(120)]]  # the second one gets index ticks
    series = {k: [rng.random(len(t)) for t in many] for k in ("drafts", "TokUR")}
    _png(plots.eu_traces(tmp_path / "sub" / "many.png", many, series))
    with pytest.raises(ValueError, match="response 0 has shape"):
        plots.eu_traces(tmp_path / "bad.png", tokens, {"x": np.zeros(3)})
    with pytest.raises(ValueError, match="empty"):
        plots.eu_traces(tmp_path / "bad.png", tokens, {})


def test_roc_curves(tmp_path):
    rng = np.random.default_rng(1)
    wrong = rng.random(80) < 0.4
    curves = {name: metrics.roc_points(wrong + rng.normal(0, s, 80), wrong)
              for name, s in (("drafts_ddd", 0.7), ("tokur", 0.8), ("entropy", 2.0))}
    _png(plots.roc_curves(tmp_path / "roc.png", curves))
    with pytest.raises(ValueError, match="must be equal 1-D"):
        plots.roc_curves(tmp_path / "bad.png", {"x": ([0, 1], [0, 0.5, 1], 0.5)})


def test_cost_quality_lists_points_it_cannot_place(tmp_path):
    points = {"drafts_ddd": (2e6, 0.74), "drafts_idd": (2e6, 0.66), "tokur": (3e7, 0.75),
              "entropy": (3e6, 0.70), "maxprob": (3e6, 0.69), "ground_truth": (1e8, None),
              "broken": (float("nan"), 0.6)}
    _png(plots.cost_quality(tmp_path / "cq.png", points))
    with pytest.raises(ValueError, match="empty"):
        plots.cost_quality(tmp_path / "bad.png", {})


@pytest.mark.parametrize("points, ylim", [
    # the 6-layer End-to-end plane on AMD: single_draft's label used to run through drafts_ddd's marker
    ({"drafts_ddd": (2.89e6, 0.710), "drafts_ddd_osd": (4.42e6, 0.708), "drafts_idd": (2.89e6, 0.685),
      "single_draft": (2.07e6, 0.689), "tokur": (1.54e7, 0.637), "entropy": (1.54e6, 0.732),
      "maxprob": (1.54e6, 0.752), "loglik": (1.54e6, 0.748)}, (0.45, 0.83)),
    # the Intel host's: three labels near the top used to be pushed above the axes, over the note
    ({"drafts_ddd": (2.89e6, 0.784), "drafts_ddd_osd": (4.43e6, 0.784), "drafts_idd": (2.89e6, 0.766),
      "single_draft": (2.07e6, 0.753), "tokur": (1.54e7, 0.605), "entropy": (1.54e6, 0.767),
      "maxprob": (1.54e6, 0.789), "loglik": (1.54e6, 0.787)}, (0.45, 0.869)),
])
def test_labels_stay_inside_and_clear_markers_notes_and_each_other(points, ylim):
    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=130)
    ax.set_xscale("log")
    ax.set_xlim(7e5, 9e7)
    ax.set_ylim(*ylim)
    note = ax.text(0.01, 0.99, "↖ cheaper and more accurate", transform=ax.transAxes, ha="left", va="top", fontsize=8)
    texts = [ax.annotate(f"{name} (0.19× tokur)", xy, xytext=(8, 5), textcoords="offset points", fontsize=8.5,
                         va="center") for name, xy in points.items()]
    fig.draw_without_rendering()
    plots._place_labels(fig, texts, obstacles=[note])
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in texts]
    area, note_box = ax.get_window_extent(renderer), note.get_window_extent(renderer)
    r = 4.5 * fig.dpi / 72
    markers = [ax.transData.transform(xy) for xy in points.values()]
    for i, b in enumerate(boxes):
        assert not any(b.overlaps(o) for j, o in enumerate(boxes) if j != i)
        assert not any(b.x0 < x + r and x - r < b.x1 and b.y0 < y + r and y - r < b.y1 for x, y in markers)
        assert not b.overlaps(note_box)
        assert area.x0 <= b.x0 and b.x1 <= area.x1 and area.y0 <= b.y0 and b.y1 <= area.y1
    plt.close(fig)


def test_speculative_speedup(tmp_path):
    rows = [{"variant": "hf", "gamma": 0, "speedup": 1.0}, {"variant": "plain+EU", "gamma": 0, "speedup": 0.6}]
    for g in (1, 2, 4, 8):
        rows += [{"variant": "spec", "gamma": g, "speedup": 0.9 + g / 40, "tokens_per_round": 1 + 0.7 * g},
                 {"variant": "spec+EU", "gamma": g, "speedup": 0.85 + g / 50, "tokens_per_round": 1 + 0.7 * g},
                 {"variant": "assisted", "gamma": g, "speedup": 0.7}]  # no tokens per round: speed only
    rows.append({"variant": "spec τ=0.7", "gamma": 4, "speedup": float("nan"), "tokens_per_round": 3.0})
    _png(plots.speculative_speedup(tmp_path / "spec.png", rows))
    with pytest.raises(ValueError, match="no rows with γ > 0"):
        plots.speculative_speedup(tmp_path / "bad.png", rows[:2])
