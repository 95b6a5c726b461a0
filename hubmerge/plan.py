"""build_plan: headers in, :class:`MergePlan` out. Pure: reads no tensor bytes and writes nothing.

The plan checks every tensor's presence, shape and dtype across models, applies the recipe's rules, and fixes
the output layout (shard files, their headers, each tensor's byte offset), so the run can write every tensor
at its final place as soon as it is merged.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import PlanError
from .globs import unmatched_glob_hint
from .layout import WRITE_QUEUE, Job, Shard, lay_out, with_chunks, working_set
from .params import resolve_params, seed_of
from .recipe import Recipe, Rule, parse_size
from .refs import ModelRef
from .sources import TensorSource
from .sources.header import DTYPE_CODES, DTYPE_NAMES, DTYPE_SIZES, FLOAT_DTYPES, TensorInfo

if TYPE_CHECKING:
    from .methods.spec import MethodSpec

__all__ = ["DEFAULT_MEMORY_BUDGET", "WRITE_QUEUE", "Job", "MergePlan", "Shard", "SourceInfo", "build_plan"]

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes of compute buffers per tensor before merging it in row chunks


def model_key(ref: ModelRef, commit: str | None) -> str:
    """The model a reference reads: its path, or its repository at the commit, not by the revision written
    (``org/x``, ``org/x@main`` and ``org/x@<its sha>`` are one model: a resume may pin a moved branch's)."""
    return f"{ref.path}@{commit}" if ref.path is not None else f"{ref.repo_id}@{commit}"


@dataclass(frozen=True)
class SourceInfo:
    """A model as the plan records it: role label, reference, pinned commit (Hub sources), and whether a Hub
    model's tensors are read from the local Hugging Face cache."""

    label: str
    ref: ModelRef
    commit: str | None
    cached: bool = False
    stamp: str | None = None  # a local source's weight files' sizes and times (LocalSource.stamp)
    private: bool = False  # a private Hub repository (its id, not its files, shows in a public push's card)

    def identity(self) -> str:
        """What the source is (:func:`model_key`) and, for local files, their stamp."""
        return model_key(self.ref, self.commit) + (f"#{self.stamp}" if self.stamp else "")


@dataclass(frozen=True, repr=False)
class MergePlan:
    """Every output tensor (``jobs``), shard and byte offset of a merge, fixed from headers alone."""

    recipe: Recipe  # pinned: each Hub model at its resolved commit (Recipe.pinned)
    recipe_sha256: str  # of the pinned recipe, local paths left out (Recipe.portable_sha256)
    method: str
    sources: tuple[SourceInfo, ...]
    jobs: tuple[Job, ...]
    shards: tuple[Shard, ...]
    skipped: tuple[str, ...]
    notices: tuple[str, ...]
    model_dtype: str
    compute_dtype: str
    bytes_read: int
    bytes_written: int
    peak_memory: int  # the merge's own buffers at their largest; the interpreter and torch come on top
    total_size: int
    memory_budget: int = field(default=DEFAULT_MEMORY_BUDGET)

    def __repr__(self) -> str:  # a summary: the jobs of a 7B model would print megabytes
        return (
            f"MergePlan(method={self.method!r}, sources={[str(s.ref) for s in self.sources]}, "
            f"tensors={len(self.jobs)}, shards={len(self.shards)}, bytes_read={self.bytes_read}, "
            f"bytes_written={self.bytes_written}, notices={len(self.notices)})"
        )

    def fingerprint(self) -> str:
        """Identifies the exact output: same fingerprint, same bytes. Resume refuses a different one."""
        h = hashlib.sha256(self.recipe_sha256.encode())
        for src in self.sources:
            h.update(f"{src.label}={src.identity()}".encode())
        for shard in self.shards:
            h.update(shard.filename.encode() + shard.header)
        return h.hexdigest()

    def to_json(self) -> dict[str, Any]:
        """The plan as plain data (``hubmerge plan --json``)."""
        return {
            "method": self.method,
            "recipe_sha256": self.recipe_sha256,
            "sources": [
                {"label": s.label, "ref": str(s.ref), "commit": s.commit, "cached": s.cached}
                for s in self.sources
            ],
            "shards": [{"file": s.filename, "bytes": s.size, "tensors": len(s.jobs)} for s in self.shards],
            "tensors": [
                {
                    "name": j.name,
                    "action": j.action,
                    "shape": list(j.shape),
                    "dtype": j.dtype,
                    "shard": self.shards[j.shard].filename,
                    "offset": j.offset,
                    "bytes": j.nbytes,
                    "chunk_rows": j.chunk_rows,
                    "from": [self.sources[s].label for s in j.sources],
                    "params": j.params,
                }
                for j in self.jobs
            ],
            "skipped": list(self.skipped),
            "notices": list(self.notices),
            "model_dtype": self.model_dtype,
            "compute_dtype": self.compute_dtype,
            "estimate": {
                "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written,
                "peak_memory": self.peak_memory,
            },
        }


def build_plan(
    recipe: Recipe, sources: Sequence[TensorSource], *, memory_budget: int = DEFAULT_MEMORY_BUDGET
) -> MergePlan:
    """Plan a merge from headers alone.

    Args:
        recipe: the validated recipe.
        sources: one open source per model, in recipe order, then the base model's if the recipe has one.
        memory_budget: compute-buffer bytes per tensor above which elementwise methods merge in row chunks.

    Returns:
        The frozen plan.

    Raises:
        PlanError: a tensor is missing somewhere, shapes differ, or integer and float tensors are mixed.
    """
    from .methods import get_method

    # Hub models at the commits they resolved to: the recipe the output stores, and what its SHA-256 names.
    recipe = recipe.pinned([s.commit for s in sources])
    spec = get_method(recipe.method)
    n = len(recipe.models)
    models, base = list(sources[:n]), (sources[n] if recipe.base is not None else None)
    compute_size = DTYPE_SIZES[DTYPE_CODES[recipe.compute_dtype]]
    out_code = DTYPE_CODES[recipe.dtype] if recipe.dtype else None
    names = _all_names(models)
    seed, sha = seed_of(recipe), recipe.portable_sha256()
    specs: list[dict[str, Any]] = []
    skipped: list[str] = []
    mixed: list[str] = []
    applied: set[int] = set()  # the rules some tensor went by (id of the rule)
    for name in names:
        rule = _rule_for(recipe.rules, name)
        if rule is not None:
            applied.add(id(rule))
        if rule is not None and rule.skip:
            skipped.append(name)
            continue
        if rule is not None and rule.take is not None:
            index = n if rule.take == "base" else rule.take
            src = sources[index]
            if name not in src.tensors:
                raise PlanError(
                    f"tensor '{name}': rules say take it from {src.label}, which lacks it",
                    tensor=name,
                    hint="take it from a model that has it, or skip it",
                )
            info = src.tensors[name]
            # The output's config.json and tokenizer come from the base, else the first model (companions):
            # a tensor of another shape (a resized vocabulary) would not fit them, and transformers would
            # initialise it at random with a warning.
            origin = base if base is not None else models[0]
            fits = origin.tensors.get(name)
            if fits is not None and fits.shape != info.shape:
                raise PlanError(
                    f"tensor '{name}' is taken from {src.label} with shape {list(info.shape)}, but the "
                    f"output's config and tokenizer come from {origin.label}, whose '{name}' is "
                    f"{list(fits.shape)}: the merged model would not load as merged",
                    tensor=name,
                    hint=f"list {src.label}'s model first in `models:`, so that its config and tokenizer "
                    "come with it (and reorder what follows the models' order: `take:` numbers, per-model "
                    "lists; linear's and slerp's t becomes 1 - t)"
                    if base is None
                    else "they come from the base: give the base the same shape first (transformers' "
                    "resize_token_embeddings, then save_pretrained), and merge with that",
                )
            dtype = out_code if out_code and info.dtype in FLOAT_DTYPES else info.dtype
            specs.append(
                dict(name=name, action="copy", inputs=(info,), sources=(index,), dtype=dtype, params={})
            )
            continue
        inputs = _present_everywhere(name, models)
        shapes = {info.shape for info in inputs}
        base_info = base.tensors.get(name) if base is not None and spec.needs_base else None
        if base is not None and spec.needs_base:
            if base_info is None:
                raise PlanError(
                    f"tensor '{name}' is in the models but not in the base ({base.label}: {base.ref})",
                    tensor=name,
                    hint=f"add a rule `- {{tensors: '{name}', take: 0}}` to copy it from one model",
                )
            shapes.add(base_info.shape)
        if len(shapes) > 1:
            found = ", ".join(f"{s.label} {list(i.shape)}" for s, i in zip(models, inputs, strict=True))
            if base_info is not None:
                found += f", base {list(base_info.shape)}"
            raise PlanError(
                f"tensor '{name}' has different shapes: {found}",
                tensor=name,
                hint="the models must share an architecture; or add a rule `take: N` for this tensor",
            )
        dtypes = {info.dtype for info in inputs} | ({base_info.dtype} if base_info else set())
        floats = dtypes & FLOAT_DTYPES
        if floats and floats != dtypes:
            raise PlanError(
                f"tensor '{name}' is a float tensor in some models and an integer tensor in others "
                f"({', '.join(f'{s.label} {i.dtype}' for s, i in zip(models, inputs, strict=True))})",
                tensor=name,
                hint="add a rule `take: N` for this tensor",
            )
        if not floats:
            # Integer and bool tensors (position ids, masks) are never averaged: copied, and must agree.
            specs.append(
                dict(
                    name=name,
                    action="copy",
                    inputs=tuple(inputs),
                    sources=tuple(range(n)),
                    dtype=inputs[0].dtype,
                    params={},
                )
            )
            continue
        if len(dtypes) > 1:
            mixed.append(
                f"{name} ({', '.join(f'{s.label} {i.dtype}' for s, i in zip(models, inputs, strict=True))})"
            )
        overrides = rule.parameters if rule is not None else {}
        specs.append(
            dict(
                name=name,
                action="merge",
                inputs=tuple(inputs),
                sources=tuple(range(n)),
                base=base_info,
                base_source=n if base_info is not None else None,
                dtype=out_code or inputs[0].dtype,
                params=resolve_params(recipe, spec, overrides),
            )
        )
    rule_notices = _check_rules(recipe.rules, names, applied)
    if not specs:
        raise PlanError(
            "no tensors to write: every tensor is skipped", hint="check the `rules:` of the recipe"
        )
    jobs, shards = lay_out(specs, sha, parse_size(recipe.output.max_shard_size), seed)
    jobs = [with_chunks(job, compute_size, memory_budget, spec.blockwise) for job in jobs]
    notices = rule_notices
    if mixed:
        target = recipe.compute_dtype
        notices.append(
            f"{len(mixed)} tensors have different dtypes across models, e.g. {mixed[0]}; "
            f"they are merged in {target} and written as the output dtype"
        )
    # By position: a model listed twice (or also the base) is opened once, under its first label.
    labels = [*(f"models.{i}" for i in range(n)), *(["base"] if base is not None else [])]
    notices += _source_notices(recipe, spec, sources)
    limit = parse_size(recipe.output.max_shard_size)
    over = [j for j in jobs if j.nbytes > limit]
    if over:
        biggest = max(over, key=lambda j: j.nbytes)
        notices.append(
            f"{len(over)} tensor(s) are larger than max_shard_size ({recipe.output.max_shard_size}), e.g. "
            f"{biggest.name} ({biggest.nbytes} bytes): each has a shard of its own, larger than that"
        )
    source_infos = tuple(
        SourceInfo(label, s.ref, s.commit, s.cached, getattr(s, "stamp", None), getattr(s, "private", False))
        for label, s in zip(labels, sources, strict=True)
    )
    float_bytes: dict[str, int] = {}
    for job in jobs:
        if job.dtype in FLOAT_DTYPES:
            float_bytes[job.dtype] = float_bytes.get(job.dtype, 0) + job.nbytes
    model_dtype = DTYPE_NAMES[max(float_bytes, key=lambda d: float_bytes[d])] if float_bytes else "float32"
    return MergePlan(
        recipe=recipe,
        recipe_sha256=sha,
        method=spec.name,
        sources=source_infos,
        jobs=tuple(jobs),
        shards=tuple(shards),
        skipped=tuple(skipped),
        notices=tuple(notices),
        model_dtype=model_dtype,
        compute_dtype=recipe.compute_dtype,
        bytes_read=sum(i.nbytes for j in jobs for i in (*j.inputs, *([j.base] if j.base else []))),
        bytes_written=sum(s.size for s in shards),
        peak_memory=max(
            working_set(
                j,
                compute_size,
                workers=os.cpu_count() or 1,
                blockwise=spec.blockwise,
                hub_inputs=sum(sources[s].ref.is_hub for s, _ in j.reads()),
                repeated=bool(spec.passes) and not spec.elementwise,
            )
            for j in jobs
        ),
        total_size=sum(j.nbytes for j in jobs),
        memory_budget=memory_budget,
    )


def _source_notices(recipe: Recipe, spec: MethodSpec, sources: Sequence[TensorSource]) -> list[str]:
    """What the plan should say about the sources: a model listed twice, a base among the models, a base
    the method does not merge."""
    notices: list[str] = []
    n = len(recipe.models)
    seen: dict[str, str] = {}
    for i, source in enumerate(sources[:n]):
        label = f"models.{i}"  # a model listed twice is opened once: its source has the first one's label
        identity = model_key(source.ref, source.commit)
        if identity in seen:
            notices.append(f"{label} is {seen[identity]} again ({source.ref}): it counts twice in the merge")
        seen.setdefault(identity, label)
    if recipe.base is not None:
        base = sources[n]
        again = seen.get(model_key(base.ref, base.commit))
        if not spec.needs_base:
            notices.append(
                f"method '{spec.name}' merges no base: the base ({base.ref}) gives the output its config and "
                "tokenizer files only"
            )
        elif again is not None:
            notices.append(f"{again} is the base ({base.ref}): its task vector is zero")
    if "seed" in recipe.parameters and not spec.random:  # accepted, as a recipe for several methods sets it
        notices.append(f"method '{spec.name}' draws no random numbers: `seed` changes nothing")
    return notices


def _all_names(models: Sequence[TensorSource]) -> list[str]:
    seen: dict[str, None] = {}
    for src in models:
        for info in sorted(src.tensors.values(), key=lambda i: (i.file, i.start)):
            seen.setdefault(info.name, None)
    return list(seen)


def _check_rules(rules: Sequence[Rule], names: Sequence[str], applied: set[int]) -> list[str]:
    """Refuse a `take` or `parameters` rule that applies to no tensor, or one of whose globs matches none:
    a misspelt glob would merge what the rule meant to take or treat apart. A `skip` rule that skips less
    than it names gives a notice (returned).

    Raises:
        PlanError: naming the rule and the glob, with the closest glob of the model's tensors.
    """
    notices = []
    for i, rule in enumerate(rules):
        unmatched = [g for g in rule.globs if not any(fnmatch.fnmatchcase(n, g) for n in names)]
        if id(rule) in applied and not unmatched:
            continue
        if unmatched:  # `hubmerge plan --json` fails here too: the hint shows tensor names
            problem, hint = (
                f"its glob {unmatched[0]!r} matches no tensor",
                unmatched_glob_hint(unmatched[0], names),
            )
        else:
            problem, hint = (
                "an earlier rule takes every tensor it matches",
                "reorder the rules, or remove this one",
            )
        if rule.skip:
            notices.append(f"rules.{i} ({', '.join(rule.globs)}) skips less than it names: {problem}")
            continue
        raise PlanError(
            f"rules.{i} ({', '.join(rule.globs)}) does not apply as written: {problem}", hint=hint
        )
    return notices


def _rule_for(rules: Sequence[Rule], name: str) -> Rule | None:
    for rule in rules:
        if any(fnmatch.fnmatchcase(name, glob) for glob in rule.globs):
            return rule
    return None


def _present_everywhere(name: str, models: Sequence[TensorSource]) -> list[TensorInfo]:
    lacking = [src for src in models if name not in src.tensors]
    if lacking:
        having = [src for src in models if name in src.tensors]
        raise PlanError(
            f"tensor '{name}' is in {', '.join(f'{s.label} ({s.ref})' for s in having)} but missing in "
            f"{', '.join(f'{s.label} ({s.ref})' for s in lacking)}",
            tensor=name,
            hint=f"the models must share an architecture; to keep it anyway add a rule "
            f"`- {{tensors: '{name}', take: N}}`, or `skip: true` to leave it out",
        )
    return [src.tensors[name] for src in models]
