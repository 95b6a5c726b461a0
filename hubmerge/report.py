"""Text for people: plan tables, method lists, sizes. Pure functions; the CLI prints what they return."""

from __future__ import annotations

from collections import Counter

from .methods import METHODS
from .params import SEED_DOC
from .plan import MergePlan


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def plan_summary(plan: MergePlan) -> str:
    """A few lines: method, sources, output layout, estimates, notices."""
    lines = [f"method   {plan.method}  (compute {plan.compute_dtype}, output {plan.model_dtype})"]
    for src in plan.sources:
        pin = f"  @ {src.commit}" if src.commit else ""
        lines.append(f"{src.label:<9}{src.ref}{pin}" + ("  (local Hugging Face cache)" if src.cached else ""))
    actions = Counter(job.action for job in plan.jobs)
    chunked = sum(job.chunk_rows is not None for job in plan.jobs)
    lines.append(
        f"tensors  {actions['merge']} merged, {actions['copy']} copied, {len(plan.skipped)} skipped"
        + (f", {chunked} in row chunks" if chunked else "")
    )
    lines.append(f"output   {len(plan.shards)} shard(s), {human_bytes(plan.bytes_written)}")
    lines.append(
        f"estimate read {human_bytes(plan.bytes_read)}, write {human_bytes(plan.bytes_written)}, "
        f"merge buffers {human_bytes(plan.peak_memory)} at most (Python and torch take ~150 MiB more)"
    )
    lines += [f"notice   {notice}" for notice in plan.notices]
    return "\n".join(lines)


def plan_table(plan: MergePlan) -> str:
    """Every output tensor: name, shape, dtype, action, source models, shard and offset."""
    rows = [("tensor", "shape", "dtype", "action", "from", "shard", "offset")]
    for job in plan.jobs:
        origin = (
            "all"
            if job.action == "merge" and len(job.sources) > 1
            else ",".join(plan.sources[s].label.replace("models.", "") for s in job.sources[:1])
        )
        rows.append(
            (
                job.name,
                "x".join(map(str, job.shape)) or "()",
                job.dtype,
                job.action,
                origin,
                plan.shards[job.shard].filename,
                str(job.offset),
            )
        )
    rows += [(name, "", "", "skip", "", "", "") for name in plan.skipped]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n\n" + plan_summary(plan)


def methods_table() -> str:
    """Every method with its parameters, for ``hubmerge methods``."""
    lines = []
    for spec in METHODS.values():
        count = f"{spec.min_models}" if spec.min_models == spec.max_models else f"{spec.min_models}+"
        need = ", needs base" if spec.needs_base else ""
        lines.append(f"{spec.name}  ({count} models{need})  {spec.summary}")
        lines.append(f"    paper: {spec.paper}")
        for p in spec.params:
            default = "required" if p.default is None else f"default {p.default}"
            scope = "per model" if p.per_model else "global"
            lines.append(f"    {p.name:<10} {p.type.__name__:<6} {scope:<9} {default:<14} {p.doc}")
        if spec.random:
            lines.append(f"    {'seed':<10} {'int':<6} {'global':<9} {'default 0':<14} {SEED_DOC}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
