"""The Markdown of ``epikern bench sweep``: the references per σ, then one row per point.

    format_sweep(sweep) -> str      (``sweep`` as written to ``sweep.json``)
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

__all__ = ["format_sweep"]

#: column → (header, format)
COLUMNS = {"rmse": ("RMSE", ".3g"), "rmse_calibrated": ("RMSE cal.", ".3g"), "pearson": ("Pearson", ".3f"),
           "spearman": ("Spearman", ".3f"), "auroc_lr": ("AUROC LR", ".3f"), "auroc_mean": ("AUROC mean", ".3f"),
           "auroc_max": ("AUROC max", ".3f"), "auroc_sum": ("AUROC sum", ".3f"), "auroc_tokur": ("AUROC TokUR", ".3f"),
           "prr": ("PRR", ".3f"), "auroc_lr_with_entropy": ("AUROC LR with entropy", ".3f"),
           "flops_vs_tokur": ("FLOPs ÷ TokUR", ".3f"), "draft_step_vs_target_step": ("draft ÷ target step", ".2f"),
           "jsd_pearson": ("Pearson of jsd alone", ".3f"), "jsd_mean": ("jsd mean", ".3g"),
           "kl_mean": ("kl mean", ".3g")}


def _cell(value: Optional[float], fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, fmt)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def format_sweep(sweep: Mapping) -> str:
    """The sweep as Markdown: where it ran, the references of each σ, the points."""
    m, e = sweep["machine"], sweep["evaluation"]
    cpu = m.get("cpu") or m.get("processor") or m.get("platform", "")
    parts = [f"# epikern bench sweep\n\n{e['problems']} held-out problems of the tiny target "
             f"({sweep['target']['layers']} layers, accuracy {sweep['target']['heldout_accuracy']:.1%}); ground truth "
             f"M = {e['ground_truth_samples']}; {sweep['wall_s']:.0f} s on {cpu} "
             f"(trained {len(sweep['trained'])} point(s), scored {len(sweep['scored'])}).\n"]
    ref_cols = ["rmse", "rmse_calibrated", "pearson", "spearman", "auroc_lr", "auroc_mean", "auroc_max", "auroc_sum",
                "auroc_tokur", "prr", "auroc_lr_with_entropy", "flops_vs_tokur"]
    rows = []
    for sigma, refs in sweep["references"].items():
        for name in ("tokur", "entropy", "length", "oracle_drafts", "oracle_jsd"):
            rows.append([f"{name} (σ={sigma})"] + [_cell(refs[name].get(c), COLUMNS[c][1]) for c in ref_cols])
        gt = refs["ground_truth"]
        cells = {"pearson": _cell(gt["split_half_pearson"], ".3f"), "spearman": _cell(gt["split_half_spearman"], ".3f"),
                 "flops_vs_tokur": _cell(gt["flops_vs_tokur"], ".3f")}
        rows.append([f"ground truth split-half (σ={sigma})"] + [cells.get(c, "–") for c in ref_cols])
    parts.append("## References\n\n" + _table(["method"] + [COLUMNS[c][0] for c in ref_cols], rows))
    if sweep.get("oracle_by_k"):
        k_cols = ["rmse", "rmse_calibrated", "pearson", "jsd_pearson", "spearman", "auroc_lr", "auroc_lr_with_entropy",
                  "prr", "flops_vs_tokur"]
        by_k = sorted(sweep["oracle_by_k"].items(), key=lambda item: int(item[0]))  # JSON sorts "16" before "2"
        rows = [[k] + [_cell(o.get(c), COLUMNS[c][1]) for c in k_cols] for k, o in by_k]
        parts.append("## Oracle drafts against K (σ = 0.1): the ceiling of K drafts\n\n"
                     + _table(["K"] + [COLUMNS[c][0] for c in k_cols], rows))
    cols = list(COLUMNS)
    rows = [[p["name"], p["group"], f"{p['sigma']:g}"] + [_cell(p.get(c), COLUMNS[c][1]) for c in cols]
            for p in sweep["points"] if "rmse" in p]
    parts.append("## Points\n\n" + _table(["point", "group", "σ"] + [COLUMNS[c][0] for c in cols], rows))
    if sweep.get("plots"):
        parts.append("## Plots\n\n" + "\n".join(f"![{t}]({p})" for t, p in sweep["plots"].items()))
    return "\n\n".join(parts) + "\n"
