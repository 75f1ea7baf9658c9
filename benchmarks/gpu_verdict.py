"""The verdict of ``benchmarks/gpu_check.sh``: one Markdown table, last, and the exit status.

Reads the steps the script recorded (``step<TAB>ok|FAIL|skipped<TAB>detail`` lines), the GPU
tests' junit XML and ``bench_gpu.py``'s JSON, and prints: each step with its result; the tests
(passed / failed / skipped, and the failed ones by name); per benchmarked kernel its fraction of
copy bandwidth and its ratios against torch.compile and Liger; the design §7 target lines. Exits 1
naming every failed step (a missing junit or bench file counts as a failure of its step), else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_steps(path: Path) -> list[tuple[str, str, str]]:
    rows = []
    for line in path.read_text().splitlines():
        step, result, detail = (line.split("\t") + ["", ""])[:3]
        rows.append((step, result, detail))
    return rows


def junit_summary(path: Path) -> tuple[dict[str, int], list[str]]:
    """``{tests, failures, errors, skipped, passed}`` and the ids of failed or erroring tests."""
    root = ET.parse(path).getroot()
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    failed = []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failures"] += 1
            failed.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failed.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts, failed


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def bench_rows(bench: dict) -> list[str]:
    """Markdown rows of the timed kernels and baselines: % of copy bandwidth, × compile, × Liger."""
    out = []
    for row in bench.get("rows", []):
        if row.get("ms") is None:
            continue
        extra = row.get("extra", {})
        out.append(f"| {row['shape']} | {row['impl']} | {_fmt(row['ms'], '.4f')} ms "
                   f"| {_fmt(extra.get('pct_copy'), '.0f')} | {_fmt(extra.get('x_vs_compile'), '.1f')} "
                   f"| {_fmt(extra.get('x_vs_liger'), '.1f')} |")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=Path, required=True)
    parser.add_argument("--junit", type=Path, required=True)
    parser.add_argument("--bench", type=Path, required=True)
    parser.add_argument("--backends", default="", help="available backends, as the script found them")
    parser.add_argument("--seconds", type=int, default=0, help="wall time of the run so far")
    args = parser.parse_args(argv)

    steps = read_steps(args.steps)
    failed_steps = [step for step, result, _ in steps if result == "FAIL"]
    lines = ["## gpu_check verdict", "", "| step | result | detail |", "|---|---|---|"]
    lines += [f"| {step} | {result} | {detail} |" for step, result, detail in steps]
    lines.append(f"| backends | | {args.backends} |")

    if args.junit.exists():
        counts, failed_tests = junit_summary(args.junit)
        detail = (f"{counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors, "
                  f"{counts['skipped']} skipped of {counts['tests']}")
        if failed_tests:
            shown = ", ".join(failed_tests[:15])
            detail += f": {shown}" + (f" (+{len(failed_tests) - 15} more)" if len(failed_tests) > 15 else "")
        lines.append(f"| test results | {'FAIL' if failed_tests else 'ok'} | {detail} |")
        if failed_tests and "tests" not in failed_steps:
            failed_steps.append("tests")
    else:
        lines.append(f"| test results | FAIL | no junit XML at {args.junit} |")
        failed_steps.append("tests (no junit XML)")

    bench = None
    if args.bench.exists():
        bench = json.loads(args.bench.read_text())
        info = bench.get("info", {})
        lines.append(f"| bench machine | | {info.get('device')}: copy {_fmt(info.get('copy_gbps'), '.0f')} GB/s, "
                     f"empty launch {_fmt(info.get('empty_launch_us'), '.1f')} µs, torch {info.get('torch')}, "
                     f"triton {info.get('triton')}, liger {info.get('liger_kernel')} |")
    else:
        lines.append(f"| bench results | FAIL | no benchmark JSON at {args.bench} |")
        failed_steps.append("bench (no JSON)")

    if bench is not None:
        lines += ["", "| shape | impl | time | % copy | × torch.compile | × Liger |", "|---|---|---|---|---|---|"]
        lines += bench_rows(bench)
        targets = bench.get("targets", [])
        if targets:
            lines += ["", "design §7 targets:"] + [f"- {t}" for t in targets]
        lines += [""] + [f"    {line}" for line in bench.get("forward_kl", [])]

    lines.append("")
    if failed_steps:
        lines.append(f"gpu_check: FAILED ({args.seconds}s): {', '.join(dict.fromkeys(failed_steps))}")
    else:
        lines.append(f"gpu_check: PASSED ({args.seconds}s)")
    print("\n".join(lines))
    return 1 if failed_steps else 0


if __name__ == "__main__":
    sys.exit(main())
