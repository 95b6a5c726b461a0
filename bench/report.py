"""Turn the benchmark's samples into the markdown of bench/RESULTS.md: machine, table, targets."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from measure import Sample, Summary

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
ANON_LIMIT = 400 * 10**6
LINEAR_METHODS = ("linear", "weighted", "centroid", "task_arithmetic")
SPARSE_METHODS = ("ties", "dare_ties")
TARGET_FAMILY = "mid"


def summaries(case: dict[str, Any]) -> dict[str, Summary]:
    """Per tool, the summary of a case's samples."""
    return {tool: Summary.of([Sample(**s) for s in ss]) for tool, ss in case["samples"].items()}


def _ratio(a: Summary | None, b: Summary | None) -> float | None:
    return a.median / b.median if a and b else None


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "" if x is None else format(x, spec)


def table(results: list[dict[str, Any]]) -> list[str]:
    """One row per (family, method, tool)."""
    lines = [
        "| models | method | tool | median s | min-max s | GB/s in | peak RSS GB | peak anon MB "
        "| hubmerge/floor | mergekit/hubmerge |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in results:
        s = summaries(case)
        hub, floor, mk = s.get("hubmerge"), s.get("floor"), s.get("mergekit")
        count = case["input_bytes"] // case["model_bytes"]
        models = f"{case['family']} {count}x{case['model_bytes'] / 1e9:.2f} GB"
        for tool, m in s.items():
            ratios = ["", ""]
            if tool == "hubmerge":
                ratios = [_fmt(_ratio(hub, floor)), _fmt(_ratio(mk, hub), ".1f")]
            lines.append(
                f"| {models} | {case['method']} | {tool} | {m.median:.2f} | {m.low:.2f}-{m.high:.2f} "
                f"| {case['input_bytes'] / 1e9 / m.median:.2f} | {m.peak_rss / 1e9:.2f} "
                f"| {m.peak_anon / 1e6:.0f} | {ratios[0]} | {ratios[1]} |"
            )
    return lines


def targets(results: list[dict[str, Any]]) -> list[str]:
    """Each target of the issue, met or not, with the numbers."""
    by = {(c["family"], c["method"]): c for c in results}
    lines = []

    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    for (family, method), case in by.items():
        if family != TARGET_FAMILY:
            continue
        s = summaries(case)
        hub, floor, mk = s.get("hubmerge"), s.get("floor"), s.get("mergekit")
        if method in LINEAR_METHODS and hub and floor:
            r = hub.median / floor.median
            lines.append(f"- {method}: hubmerge/floor {r:.2f} (target <= 1.25): {mark(r <= 1.25)}")
        if method in LINEAR_METHODS and hub and mk:
            r = mk.median / hub.median
            lines.append(f"- {method}: mergekit/hubmerge {r:.1f}x (target >= 3x): {mark(r >= 3)}")
        ties_case = by.get((family, "ties"))
        mk_ties = summaries(ties_case).get("mergekit") if ties_case else None
        if method in SPARSE_METHODS and hub and mk_ties:
            r = mk_ties.median / hub.median
            same = (
                f"; vs mergekit's own {method}: {mk.median / hub.median:.1f}x"
                if mk and method != "ties"
                else ""
            )
            ok = mark(r >= 15)
            lines.append(
                f"- {method}: mergekit ties / hubmerge {method} {r:.1f}x (target >= 15x): {ok}{same}"
            )
    worst = max(
        (
            (summaries(c)["hubmerge"].peak_anon, c["family"], c["method"])
            for c in results
            if "hubmerge" in c["samples"]
        ),
        default=None,
    )
    if worst:
        lines.append(
            f"- peak anonymous memory, every hubmerge case: at most {worst[0] / 1e6:.0f} MB "
            f"({worst[1]} {worst[2]}; target < 400 MB): {mark(worst[0] < ANON_LIMIT)}"
        )
    lines += scaling(results)
    return lines


def scaling(results: list[dict[str, Any]]) -> list[str]:
    """Seconds per input GB for each method and model size: linear growth keeps it flat."""
    lines = []
    methods = sorted({c["method"] for c in results}, key=[c["method"] for c in results].index)
    for method in methods:
        points = []
        for case in results:
            if case["method"] == method and "hubmerge" in case["samples"]:
                hub = summaries(case)["hubmerge"]
                points.append((case["input_bytes"], hub.median, case["family"]))
        if len(points) < 2:
            continue
        points.sort()
        (b0, t0, f0), (b1, t1, f1) = points[0], points[-1]
        slope = (t1 - t0) / (b1 - b0) * 1e9
        intercept = t0 - slope * b0 / 1e9
        per_gb = ", ".join(f"{f} {t / b * 1e9:.2f}" for b, t, f in points)
        lines.append(
            f"- {method} scaling: s per input GB {per_gb}; line through {f0} and {f1}: "
            f"{intercept:.2f} s + {slope:.2f} s/GB"
        )
    return lines


def render(info: dict[str, str], start: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The generated part of RESULTS.md."""
    out = ["## Latest run", "", "| machine | |", "| --- | --- |"]
    out += [f"| {k} | {v} |" for k, v in info.items()]
    out += [
        "",
        *table(results),
        "",
        "### Targets (3 models of 1.7 GB, warm page cache)",
        "",
        *targets(results),
    ]
    out += ["", "### Startup", ""]
    for key, value in start.items():
        out.append(
            f"- {key}: " + (f"{value:.3f} s" if isinstance(value, float) else (", ".join(value) or "none"))
        )
    return "\n".join(out) + "\n"


def update(path: Path, generated: str) -> None:
    """Replace the text between the markers of ``path`` (or append it) with ``generated``."""
    text = path.read_text() if path.exists() else f"# Benchmark results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    path.write_text(pattern.sub(lambda _: f"{BEGIN}\n{generated}{END}", text))
