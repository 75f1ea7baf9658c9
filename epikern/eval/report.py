"""The benchmark report: ``report.json`` (strict JSON), ``report.md`` and a terminal table (design §6).

Schema (what :func:`validate_report` checks; more keys are welcome anywhere)::

    {
      "machine":  {...},                    # epikern.eval.machine.machine_info()
      "versions": {...},                    # epikern.eval.machine.versions()
      "config":   {...},                    # the run's settings
      "methods": {                          # at least results.METHODS, each with results.METHOD_METRICS
        "drafts_ddd": {"rmse": 0.12, "pearson": 0.8, "spearman": 0.7, "auroc_lr": 0.74,
                       "auroc_tokur": 0.71, "prr": 0.4, "flops_per_token": 2.1e6,
                       "latency_ms_per_token": 3.2, ...},
        "entropy":    {"rmse": null, "rmse_reason": "not an EU estimate", ...},
        ...
      },
      "ground_truth": {"flops_per_token": ..., "latency_ms_per_token": ..., ...},
      "speculative":  [{"name": ..., "tokens_per_s": ..., "acceptance": ..., ...}, ...],
      "speculative_steps": {"target_1_ms": ..., "draft_1_ms": ..., ...},  # optional
      "plots": {"ROC curves": "roc.png", ...},        # optional: embedded in report.md
      "conventions": {...}                  # added by write_report when absent
    }

A value that is not applicable is ``null`` with a sibling ``"<key>_reason"`` string. NaN and ±inf
are not JSON: :func:`to_json_compatible` turns them into ``null`` and records a reason (unless the
report already gives one), so the file is strict JSON (``json.loads`` with no NaN extension).
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..atomic import write_atomic
from .results import METHOD_METRICS, METHODS

__all__ = ["CONVENTIONS", "to_json_compatible", "validate_report", "write_json", "write_report", "methods_table",
           "format_markdown"]

GROUND_TRUTH_KEYS = ("flops_per_token", "latency_ms_per_token")
SPECULATIVE_KEYS = ("name", "tokens_per_s", "acceptance")

#: (key, header, kind) of the methods table, in order; the FLOPs ratio is derived.
COLUMNS = (
    ("rmse", "RMSE ↓", "metric"),
    ("rmse_calibrated", "RMSE cal. ↓", "metric"),
    ("pearson", "Pearson ↑", "metric"),
    ("spearman", "Spearman ↑", "metric"),
    ("auroc_lr", "AUROC LR ↑", "metric"),
    ("auroc_mean", "AUROC mean ↑", "metric"),
    ("auroc_max", "AUROC max ↑", "metric"),
    ("auroc_sum", "AUROC sum ↑", "metric"),
    ("auroc_tokur", "AUROC TokUR ↑", "metric"),
    ("prr", "PRR ↑", "metric"),
    ("flops_per_token", "FLOPs/token", "flops"),
    ("latency_ms_per_token", "ms/token", "ms"),
)
RATIO_HEADER = "FLOPs ÷ TokUR"
#: columns of report.md that the terminal table leaves out (to fit 160 columns)
TERMINAL_OMITS = ("auroc_mean", "auroc_max", "auroc_sum")

CONVENTIONS = {
    "flops": "one multiply-add = 2 FLOPs; matmuls and attention (q·kᵀ and the weighted sum of "
             "values) counted, elementwise work not, except the epikern uncertainty op, whose "
             "scalar operations per vocabulary entry are counted (epikern.eval.cost)",
    "auroc_lr": "logistic regression on aggregated token scores, stratified k-fold CV, AUROC of "
                "the pooled out-of-fold P(wrong); positive class = wrong answer",
    "auroc_tokur": "TokUR's protocol: confidence = −(sum of token EU), AUROC for correct answers",
    "prr": "prediction rejection ratio, 0/1 loss, area between random and the score's rejection "
           "curve over the area between random and the oracle",
    "rmse": "token-level, against the ground-truth EU (mutual information of a perturbation "
            "ensemble of the target), in nats",
    "rmse_calibrated": "the same after the best linear map of the EU terms (c1·jsd + c2·kl for the draft "
                       "methods, c·score otherwise; no intercept), fit on the other folds of a 5-fold split "
                       "over responses: the information in the terms, apart from their scale",
    "auroc_mean / auroc_max / auroc_sum": "AUROC of each aggregate of the token scores alone (no fitting); "
                                          "positive class = wrong answer",
    "split_half_pearson": "Pearson between two independent ground-truth ensembles of M members each (its "
                          "own noise ceiling: no estimator can correlate much better with one of them)",
}


# --------------------------------------------------------------------------------------------
# JSON


def _nonfinite_reason(x: float) -> str:
    return "value was NaN (undefined for these inputs; no reason recorded)" if math.isnan(x) else f"value was {x}"


def _count_nonfinite(seq) -> int:
    """NaN/±inf floats inside a (nested) list, tuple or array; dicts inside carry their own reasons."""
    if isinstance(seq, np.ndarray):
        return int((~np.isfinite(seq)).sum()) if seq.dtype.kind == "f" else 0
    n = 0
    for v in seq:
        if isinstance(v, (float, np.floating)):
            n += not math.isfinite(v)
        elif isinstance(v, (list, tuple, np.ndarray)):
            n += _count_nonfinite(v)
    return n


def to_json_compatible(obj: Any, _path: str = "report") -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts.

    dicts (string keys), lists, tuples, str, bool, int, float, None, NumPy scalars and arrays and
    paths are converted; NaN/±inf become ``None`` and, inside a dict, add ``"<key>_reason"`` unless
    it exists (lists and arrays with such entries add ``"<key>_reason"`` with their count). Anything
    else raises ``TypeError`` naming where it is.
    """
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{_path} has a non-string key {k!r}")
            out[k] = to_json_compatible(v, f"{_path}[{k!r}]")
            reason = None
            if isinstance(v, (float, np.floating)) and not math.isfinite(v):
                reason = _nonfinite_reason(float(v))
            elif isinstance(v, (list, tuple, np.ndarray)) and (n := _count_nonfinite(v)):
                reason = f"{n} non-finite entries written as null"
            if reason is not None and f"{k}_reason" not in obj:
                out[f"{k}_reason"] = reason
        return out
    if isinstance(obj, np.ndarray):
        return to_json_compatible(obj.tolist(), _path)
    if isinstance(obj, (list, tuple)):
        return [to_json_compatible(v, f"{_path}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{_path} is a {type(obj).__name__}, which has no JSON form; convert it first")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_value(where: str, d: Mapping, key: str) -> None:
    if key not in d:
        raise ValueError(f"{where} lacks {key!r}")
    v = d[key]
    if v is None:
        reason = d.get(f"{key}_reason")
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"{where}[{key!r}] is null without a {key + '_reason'!r} string")
    elif not _is_number(v):
        raise ValueError(f"{where}[{key!r}] must be a number or null, got {type(v).__name__} {v!r}")


def validate_report(report: Mapping) -> dict:
    """Check the schema of the module docstring; return the JSON-compatible form.

    Raises:
        ValueError naming the first missing or malformed key, e.g.
        ``report['methods']['tokur'] lacks 'prr'``.
    """
    if not isinstance(report, Mapping):
        raise ValueError(f"report must be a dict, got {type(report).__name__}")
    r = to_json_compatible(report)
    for key in ("machine", "versions", "config", "methods", "ground_truth"):
        if key not in r:
            raise ValueError(f"report lacks {key!r}")
        if not isinstance(r[key], dict):
            raise ValueError(f"report[{key!r}] must be a dict, got {type(r[key]).__name__}")
    for name in METHODS:
        if name not in r["methods"]:
            raise ValueError(f"report['methods'] lacks {name!r} (required: {', '.join(METHODS)})")
    for name, m in r["methods"].items():
        if not isinstance(m, dict):
            raise ValueError(f"report['methods'][{name!r}] must be a dict, got {type(m).__name__}")
        for key in METHOD_METRICS:
            _check_value(f"report['methods'][{name!r}]", m, key)
    for key in GROUND_TRUTH_KEYS:
        _check_value("report['ground_truth']", r["ground_truth"], key)
    if "speculative" not in r:
        raise ValueError("report lacks 'speculative'")
    rows = r["speculative"]
    if not isinstance(rows, list) or not rows:
        raise ValueError("report['speculative'] must be a non-empty list of row dicts")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"report['speculative'][{i}] must be a dict, got {type(row).__name__}")
        if "name" not in row or not isinstance(row["name"], str):
            raise ValueError(f"report['speculative'][{i}] lacks a string 'name'")
        for key in SPECULATIVE_KEYS[1:]:
            _check_value(f"report['speculative'][{i}]", row, key)
    plots = r.get("plots", {})
    if not isinstance(plots, dict) or not all(isinstance(v, str) for v in plots.values()):
        raise ValueError("report['plots'] must map titles to PNG paths (strings)")
    return r


def write_json(path, record: Mapping) -> Path:
    """Write ``record`` as strict, indented JSON (:func:`to_json_compatible`), atomically and durably;
    the one JSON writer of the benchmarks (``report.json``, the ``--json`` of ``bench kernels`` and
    ``bench speculative``)."""
    write_atomic(path, json.dumps(to_json_compatible(record), indent=2, allow_nan=False) + "\n")
    return Path(path)


def write_report(out_dir, report: Mapping) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; return both paths.

    Adds ``conventions`` (:data:`CONVENTIONS`) and ``created`` (UTC, ISO 8601) when absent. Each
    file is written atomically and durably (:mod:`epikern.atomic`). If the report fails :func:`validate_report`, what it holds is still
    saved as ``report.invalid.json`` (nothing is lost) before the ``ValueError`` is raised.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = dict(report)
    report.setdefault("conventions", CONVENTIONS)
    report.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:
        r = validate_report(report)
    except ValueError as exc:
        try:
            write_json(out_dir / "report.invalid.json", report)
            saved = f"; the report was saved as {out_dir / 'report.invalid.json'}"
        except (TypeError, ValueError):
            saved = ""
        raise ValueError(f"{exc}{saved}") from exc
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    write_json(json_path, r)
    write_atomic(md_path, format_markdown(r, base_dir=out_dir))
    return json_path, md_path


# --------------------------------------------------------------------------------------------
# tables

_SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def _fmt(v, kind: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if not _is_number(v):
        return str(v)
    if kind == "flops":
        for scale, suffix in _SI:
            if abs(v) >= scale:
                return f"{v / scale:.3g} {suffix}"
        return f"{v:.3g}"
    if kind == "ratio":
        return f"{v:.3g}×"
    if kind == "ms":
        return f"{v:.3g}"
    if isinstance(v, int):
        return str(v)
    return f"{v:.3f}"


def _method_rows(r: Mapping, columns=COLUMNS) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows (methods in report order) and the footnotes that explain nulls."""
    methods = r.get("methods", {})
    ref = methods.get("tokur", {}).get("flops_per_token")
    header = ["method"] + [h for _, h, _ in columns] + [RATIO_HEADER]
    rows, notes = [], []
    for name, m in methods.items():
        row = [name] + [_fmt(m.get(key), kind) for key, _, kind in columns]
        flops = m.get("flops_per_token")
        ratio = flops / ref if _is_number(flops) and _is_number(ref) and ref > 0 else None
        row.append(_fmt(ratio, "ratio"))
        rows.append(row)
        for key, _, _ in columns:
            if m.get(key) is None and isinstance(m.get(f"{key}_reason"), str):
                notes.append(f"{name} {key}: {m[f'{key}_reason']}")
    return header, rows, notes


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(cell):
        return str(cell).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _kv_rows(d: Mapping) -> list[list[str]]:
    rows = []
    for k, v in d.items():
        if k.endswith("_reason"):
            continue
        if _is_number(v):
            cell = _fmt(v, "flops") if "flops" in k else str(v) if isinstance(v, int) else f"{v:.4g}"
        elif isinstance(v, (dict, list)):
            cell = json.dumps(v, ensure_ascii=False) if v else "none"
        else:
            cell = "—" if v is None else str(v)
        if v is None and isinstance(d.get(f"{k}_reason"), str):
            cell += f" ({d[f'{k}_reason']})"
        rows.append([k, cell])
    return rows


def _speculative_table(rows: list) -> str:
    keys = []
    for row in rows:
        keys += [k for k in row if not k.endswith("_reason") and k not in keys]
    body = []
    for row in rows:
        cells = []
        for k in keys:
            v = row.get(k)
            cell = _fmt(v, "ms" if k != "acceptance" else "metric") if _is_number(v) else (
                "—" if v is None else str(v))
            if v is None and isinstance(row.get(f"{k}_reason"), str):
                cell += f" ({row[f'{k}_reason']})"
            cells.append(cell)
        body.append(cells)
    return _md_table(keys, body)


def format_markdown(report: Mapping, base_dir=None) -> str:
    """``report.md``: the methods side by side, ground-truth cost, speculative rows, plots, setup.

    Plot paths are written relative to ``base_dir`` (the report's folder) when they lie inside it.
    """
    r = to_json_compatible(report)
    machine, vers = r.get("machine", {}), r.get("versions", {})
    out = ["# epikern bench: draft-based EU against TokUR", ""]
    summary = [r.get("created"), machine.get("cpu"), ", ".join(machine.get("gpus") or []) or None,
               vers.get("torch") and f"torch {vers['torch']}",
               vers.get("epikern") and f"epikern {vers['epikern']}" + (f" ({vers['epikern_git'][:12]})" if vers.get("epikern_git") else "")]
    out += [" · ".join(str(s) for s in summary if s), ""]
    out += [f"> **Warning:** {w}" for w in r.get("warnings", [])] + ([""] if r.get("warnings") else [])
    for key, title in (("dataset", "Task"), ("training", "Embedded models (training diagnostics)")):
        if r.get(key):
            out += [f"## {title}", "", _md_table(["", "value"], _kv_rows(r[key])), ""]
    header, rows, notes = _method_rows(r)
    out += ["## Methods (same responses)", "", _md_table(header, rows), ""]
    if notes:
        out += ["Not applicable or undefined:", ""] + [f"- {n}" for n in notes] + [""]
    conventions = r.get("conventions", {})
    if conventions:
        out += ["Conventions:", ""] + [f"- **{k}**: {v}" for k, v in conventions.items()] + [""]
    if r.get("ground_truth"):
        out += ["## Ground truth (reference ensemble)", "",
                _md_table(["", "value"], _kv_rows(r["ground_truth"])), ""]
    if r.get("speculative"):
        out += ["## Speculative decoding", "", _speculative_table(r["speculative"]), ""]
    if r.get("speculative_steps"):
        out += ["Step costs at the first prompt's context (ms; `target_n`: the target verifying n tokens, "
                "`draft_n`: all K drafts consuming n tokens); a round costs about γ·draft_1 + target_(γ+1):", "",
                _md_table(["", "value"], _kv_rows(r["speculative_steps"])), ""]
    plots = r.get("plots", {})
    if plots:
        out += ["## Plots", ""]
        for title, path in plots.items():
            p = Path(path)
            if base_dir is not None and p.is_absolute():
                try:
                    p = p.relative_to(Path(base_dir).resolve())
                except ValueError:
                    pass
            out += [f"### {title}", "", f"![{title}]({p.as_posix()})", ""]
    out += ["## Configuration", "", "```json", json.dumps(r.get("config", {}), indent=2), "```", ""]
    out += ["## Machine and versions", "", _md_table(["", "value"], _kv_rows({**machine, **vers})), ""]
    return "\n".join(out)


def methods_table(report: Mapping, width: int = 160) -> str:
    """The methods table for the terminal (``rich``, box drawing, no colour codes), with the
    footnotes that explain null cells."""
    from rich.console import Console
    from rich.table import Table

    r = to_json_compatible(report)
    header, rows, notes = _method_rows(r, [c for c in COLUMNS if c[0] not in TERMINAL_OMITS])
    table = Table(title="epikern bench: methods on the same responses", title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None, highlight=False)
    console.print(table)
    for n in notes:
        console.print(f"  — {n}", soft_wrap=True)
    return buf.getvalue()
