"""The Python API: ``load_recipe``, ``plan`` and ``merge``. The CLI is a thin layer over these."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from . import __version__
from .companions import check_module_weights, check_not_adapter, check_not_quantized
from .errors import HubmergeError, OutputError, RecipeError, raise_if_stopped, reworded, spoken_to_python
from .plan import DEFAULT_MEMORY_BUDGET, MergePlan, build_plan
from .publish import UPLOADED, PushTarget, uploads_read_direct
from .recipe import Dtype, Recipe, load_recipe
from .sources import TensorSource, open_source
from .writer import (
    MANIFEST,
    PROGRESS_DIR,
    OverflowCheck,
    ShardWriter,
    Sink,
    check_output,
    check_place,
    output_lock,
    partial_dir,
    recover_commit,
    write_json,
)

if TYPE_CHECKING:
    from .refs import ModelRef
    from .sources.hub import Transfer

log = logging.getLogger(__name__)

RecipeLike = Recipe | str | Path | dict[str, Any]


@dataclass(frozen=True)
class MergeResult:
    """What a merge produced."""

    out: Path
    plan: MergePlan
    seconds: float
    files: tuple[str, ...]
    resumed_tensors: int
    commit_url: str | None = None
    resumed_bytes: int = 0  # input bytes of the tensors an interrupted run had written (not read again)

    def __repr__(self) -> str:  # the plan's summary, not its every job
        return (
            f"MergeResult(out={str(self.out)!r}, tensors={len(self.plan.jobs)}, seconds={self.seconds:.2f}, "
            f"gb_per_s={self.gb_per_s:.2f}, files={len(self.files)}, commit_url={self.commit_url!r})"
        )

    @property
    def bytes_read(self) -> int:
        """Input bytes this run merged (a resumed run skips what was written)."""
        return self.plan.bytes_read - self.resumed_bytes

    @property
    def gb_per_s(self) -> float:
        """Input gigabytes merged per second."""
        return self.bytes_read / 1e9 / max(self.seconds, 1e-9)


@contextlib.contextmanager
def open_sources(
    recipe: Recipe, *, transfer: Transfer = "ranges", token: str | None = None
) -> Iterator[list[TensorSource]]:
    """Open every model of the recipe (headers only), then the base; the same reference is opened once.

    The models open concurrently (from the Hub each takes a few round trips); if any fails, the first failure
    in recipe order is raised. ``transfer`` chooses how Hub sources read tensors: ``ranges`` (HTTP Range
    requests, no disk) or ``shards`` (one downloaded shard per model at a time). ``token`` reads Hub
    models with that token instead of huggingface_hub's (``HF_TOKEN``, a login).
    """
    refs = [(f"models.{i}", ref) for i, ref in enumerate(recipe.model_refs())]
    base = recipe.base_ref()
    if base is not None:
        refs.append(("base", base))
    first: dict[str, tuple[str, ModelRef]] = {}  # each reference once, under its first label
    for label, ref in refs:
        first.setdefault(str(ref), (label, ref))
    opened: dict[str, TensorSource] = {}
    try:
        with ThreadPoolExecutor(min(8, len(first)), thread_name_prefix="hubmerge-open") as pool:
            futures = {
                key: pool.submit(open_source, ref, label=label, transfer=transfer, token=token)
                for key, (label, ref) in first.items()
            }
        failures = []
        for key, future in futures.items():
            try:
                opened[key] = future.result()
            except BaseException as exc:
                failures.append(exc)
        if failures:
            raise failures[0]
        yield [opened[str(ref)] for _, ref in refs]
    finally:
        for src in opened.values():
            src.close()


def _with_dtype(recipe: Recipe, dtype: Dtype | None) -> Recipe:
    if dtype is None:
        return recipe
    if dtype not in get_args(Dtype):
        from .recipe import dtype_hint

        raise RecipeError(
            f"dtype {dtype!r} is not one of {', '.join(get_args(Dtype))}",
            hint=dtype_hint(dtype).replace("write `", "dtype='").replace("`", "'"),
        )
    return recipe.model_copy(update={"dtype": dtype})


_TOKEN_WORDS = (
    ("set HF_TOKEN or run `hf auth login`", "pass a token= that can read it"),
    ("the token from HF_TOKEN or `hf auth login`", "the token passed as token="),
    ("HF_TOKEN or `hf auth login`", "token="),
)


def _token_words(exc: HubmergeError, kwargs: dict[str, Any]) -> None:
    """A call given ``token=``: its errors point at that token, not at HF_TOKEN, which was not read."""
    if kwargs.get("token") is not None and exc.hint:
        for said, meant in _TOKEN_WORDS:
            exc.hint = exc.hint.replace(said, meant)


_token_hints = reworded(_token_words)


@spoken_to_python
@_token_hints
def plan(
    recipe: RecipeLike,
    *,
    dtype: Dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    check_card: bool = True,
    token: str | None = None,
) -> MergePlan:
    """Load the recipe, read the models' headers, and plan the merge without reading any weight.

    Args:
        recipe: a Recipe, a path to a YAML recipe, YAML text, or a dict.
        dtype: output dtype, overriding the recipe's.
        memory_budget: compute-buffer bytes per tensor before merging in row chunks.
        check_card: also read the sources' model cards, to check that their licenses agree.
        token: the Hub token to read with (default: huggingface_hub's, from ``HF_TOKEN`` or ``hf auth
            login``).

    Returns:
        The :class:`MergePlan`: every output tensor, its shard and offset, and estimates.

    Raises:
        RecipeError, SourceError, PlanError: the recipe, a model, or their combination is wrong.
    """
    _check_budget(memory_budget)
    loaded = _with_dtype(load_recipe(recipe), dtype)
    with open_sources(loaded, token=token) as sources:
        return _checked_plan(loaded, sources, memory_budget, check_card=check_card)[0]


def _check_arguments(*, out: object, push: object, progress: object, on_plan: object) -> None:
    """merge()'s arguments of the wrong kind, refused before anything is opened or written."""
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise RecipeError(f"out is a directory path, got {out!r}", hint="e.g. out='merged'")
    if push is not None and push is not False and not isinstance(push, (str, PushTarget)):
        raise RecipeError(
            f"push is a repository id, a PushTarget or False, got {push!r}",
            hint="e.g. push='my-org/merged' (push=None: the recipe's `push:`, if any)",
        )
    for name, fn in (("progress", progress), ("on_plan", on_plan)):
        if fn is not None and not callable(fn):
            raise RecipeError(
                f"{name} is a function, got {fn!r}", hint=f"pass a callable, or leave {name} out"
            )


def _check_budget(memory_budget: int) -> None:
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0:
        raise RecipeError(
            f"memory_budget is a positive number of bytes, got {memory_budget!r}",
            hint=f"leave it out for the default ({DEFAULT_MEMORY_BUDGET})",
        )


def _checked_plan(
    recipe: Recipe, sources: list[TensorSource], memory_budget: int, *, check_card: bool = True
) -> tuple[MergePlan, dict[str, str] | None]:
    """The plan, and the sources' common license; what the models' files refuse, refused before any read.

    Raises:
        PlanError: the plan's refusals, a LoRA adapter, or a model's module with weights of its own.
        RecipeError: the sources' licenses differ (``check_card``).
    """
    from .card import common_license

    for source in _unique(sources):  # before the plan, whose refusals (a missing tensor) would mislead
        check_not_adapter(source)
        check_not_quantized(source)
    merge_plan = build_plan(recipe, sources, memory_budget=memory_budget)
    for source in _unique(sources):  # a module's weights, in any model, would be left out of the merge
        check_module_weights(source)
    license_ = common_license(merge_plan, _unique(sources)) if check_card else None
    return merge_plan, license_


def _unique(sources: list[TensorSource]) -> list[TensorSource]:
    return list({id(s): s for s in sources}.values())


def output_dir(recipe: Recipe, out: str | Path | None) -> Path:
    """The output directory: ``out`` if given (relative to the working directory), else ``output.dir``.

    Raises:
        RecipeError: neither is set.
    """
    if out is not None:
        return Path(out).expanduser().resolve()
    if recipe.output.dir is None:
        raise RecipeError(
            "no output directory", path="output.dir", hint="set `output: {dir: ...}` or pass --out DIR"
        )
    path = Path(recipe.output.dir).expanduser()
    return (path if path.is_absolute() else recipe.base_dir / path).resolve()


def check_target(recipe: Recipe, out: str | Path | None, *, force: bool, resume: bool) -> Path:
    """The output directory, checked (:func:`writer.check_output`): also what ``--dry-run`` checks.

    Raises:
        RecipeError: no output directory is given.
        OutputError: the output exists, is a file, is not an earlier merge, or touches an input.
    """
    target = output_dir(recipe, out)
    check_output(target, _local_inputs(recipe), force=force, resume=resume)
    return target


def _local_inputs(recipe: Recipe) -> list[Path]:
    return [r.path for r in [*recipe.model_refs(), recipe.base_ref()] if r is not None and r.path]


def check_device(device: str) -> None:
    """Refuse a device hubmerge does not run on, or a CUDA device torch does not see (before any output)."""
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise RecipeError(f"device {device!r} is not cpu or cuda", hint="use --device cpu or --device cuda")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise RecipeError(f"--device {device} but torch sees no CUDA device", hint="use --device cpu")


def check_space(
    target: Path, plan: MergePlan, *, resume: bool, delete_local: bool, force: bool = False
) -> None:
    """Refuse, before any read, a merge the output's disk has no room for (it would fail at the end).

    An interrupted run's shards count as room: a resume writes only the rest, and ``force`` deletes them.
    """
    import shutil

    from .report import human_bytes

    partial = partial_dir(target)
    sizes = [s.size for s in plan.shards]
    # --delete-local deletes each shard once uploaded: about one shard at a time is on disk.
    needed = max(sizes, default=0) * 2 if delete_local else sum(sizes)
    if (resume or force) and partial.is_dir():
        # Blocks on disk, not sizes: the shards are created at full length, sparse until written.
        needed -= sum(f.stat().st_blocks * 512 for f in partial.glob("*.safetensors"))
    parent = partial.parent if partial.parent.exists() else target.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise OutputError(
            f"not enough free space for the output in {parent}: the merge writes {human_bytes(needed)}, "
            f"{human_bytes(free)} are free",
            path=str(target),
            hint="free some space, or choose an --out on another disk",
        )


@spoken_to_python
@_token_hints
def merge(
    recipe: RecipeLike,
    out: str | Path | None = None,
    *,
    dtype: Dtype | None = None,
    device: str = "cpu",
    resume: bool = False,
    force: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Callable[[int], object] | None = None,
    on_plan: Callable[[MergePlan], object] | None = None,
    push: PushTarget | str | Literal[False] | None = None,
    transfer: Transfer = "ranges",
    token: str | None = None,
) -> MergeResult:
    """Merge the recipe's models into ``out`` (default: the recipe's ``output.dir``).

    Args:
        recipe: a Recipe, a path to a YAML recipe, YAML text, or a dict.
        out: output directory; must not exist unless ``force``.
        dtype: output dtype, overriding the recipe's.
        device: ``cpu`` or ``cuda``.
        resume: continue an interrupted run into the same ``out``.
        force: replace an existing ``out`` (never an input).
        memory_budget: compute-buffer bytes per tensor before merging in row chunks.
        progress: called with input bytes consumed, for progress bars.
        on_plan: called with the plan before any weight is read.
        push: publish to this Hub repository, a :class:`PushTarget` or a repository id (default: the
            recipe's ``push:``, if any; False: no push, whatever the recipe says).
        transfer: how Hub sources are read: ``ranges`` (default) or ``shards``.
        token: the Hub token to read the models and push with (default: huggingface_hub's, from
            ``HF_TOKEN`` or ``hf auth login``).

    Returns:
        A :class:`MergeResult`.

    Raises:
        HubmergeError: any failure, with what to do about it; a partial output is kept for ``resume``.
    """
    _check_budget(memory_budget)
    _check_arguments(out=out, push=push, progress=progress, on_plan=on_plan)
    if transfer not in ("ranges", "shards"):
        raise RecipeError(
            f"transfer is 'ranges' or 'shards', got {transfer!r}", hint="leave it out for ranges"
        )
    loaded = _with_dtype(load_recipe(recipe), dtype)
    check_device(device)
    settings = loaded.push.model_dump() if loaded.push is not None and push is not False else {}
    if push is False:  # the recipe's push: left out
        push = None
    if isinstance(push, str):  # a repository id, as --push takes it: the recipe's other push settings hold
        settings["repo"] = push
    if push is None or isinstance(push, str):
        push = PushTarget(repo_id=settings.pop("repo"), **settings) if settings else None
    # Where the output goes is checked before the lock (which creates the output's parent folders); the
    # rest under it, once an earlier run's commit cut short is finished or undone (recover_commit).
    target = output_dir(loaded, out)
    check_place(target, _local_inputs(loaded))
    with output_lock(target):
        return _merge_locked(
            loaded, out, device, resume, force, memory_budget, progress, on_plan, push, transfer, token=token
        )


def _merge_locked(
    loaded: Recipe,
    out: str | Path | None,
    device: str,
    resume: bool,
    force: bool,
    memory_budget: int,
    progress: Callable[[int], object] | None,
    on_plan: Callable[[MergePlan], object] | None,
    push: PushTarget | None,
    transfer: Transfer,
    *,
    token: str | None,
) -> MergeResult:
    """:func:`merge`, with the output's lock held (writer.output_lock)."""
    from .publish import HubUploader
    from .run import execute, start_reads
    from .sources.buffers import retain_freed_memory

    recover_commit(output_dir(loaded, out))
    target = check_target(loaded, out, force=force, resume=resume)
    start = time.perf_counter()
    with open_sources(loaded, transfer=transfer, token=token) as sources:
        merge_plan, license_ = _checked_plan(loaded, sources, memory_budget)
        if on_plan is not None:
            on_plan(merge_plan)
        # A pushed shard is read again as soon as it is written, around the page cache too where the upload
        # goes through the LFS protocol; Xet reads files by path, from the cache (publish.py).
        direct = push is None or uploads_read_direct()
        if resume and push is None and (partial_dir(target) / PROGRESS_DIR / UPLOADED).is_file():
            raise OutputError(
                f"the interrupted merge into {target} pushed shards and deleted them here (--delete-local): "
                "only the Hub has them",
                path=str(target),
                hint="resume with the same --push target (and --delete-local), or start over with --force",
            )
        check_space(
            target,
            merge_plan,
            resume=resume,
            force=force,
            delete_local=push is not None and push.delete_local,
        )
        writer = ShardWriter(target, resume=resume, direct=direct)
        uploader = (
            HubUploader(push, writer.tmp, read_direct=direct, resume=resume, token=token)
            if push is not None
            else None
        )
        commit_url = None
        try:
            if uploader is not None:  # the push target first: a Hub that refuses it leaves nothing here
                uploader.begin(merge_plan)
            done = writer.begin(merge_plan)
            # The first reads start now and download while torch is imported (its first use is in execute).
            start_reads(merge_plan, sources, done=frozenset(done), device=device)
            sinks: list[Sink] = [writer]
            if uploader is not None:
                sinks.append(uploader)
            overflow = OverflowCheck()
            if any(OverflowCheck.applies(job) for job in merge_plan.jobs):
                sinks.append(overflow)
            execute(merge_plan, sources, sinks, done=frozenset(done), device=device, progress=progress)
            raise_if_stopped()
            overflow.report()
            with _writing(target):
                files = finish_output(
                    merge_plan,
                    sources,
                    writer.tmp,
                    out_name=target.name,
                    repo_id=uploader.target.repo_id if uploader is not None else None,  # namespace filled in
                    revision=push.branch if push is not None else None,
                    license_=license_,
                )
            if uploader is not None:
                raise_if_stopped()  # before the commit, which cannot be taken back
                writer.check_replace(force=force)  # so is a refusal of the output's files after it
                commit_url = uploader.commit(files)
        finally:
            retain_freed_memory(False)  # execute resets it too; here for a failure between start_reads and it
            try:
                writer.close()
            finally:
                if uploader is not None:  # an upload under way stops even if the last write failed
                    uploader.close()
        raise_if_stopped()  # before the output takes its name
        writer.commit(force=force)
    elapsed = time.perf_counter() - start
    skipped = sum(
        i.nbytes
        for j in merge_plan.jobs
        if j.name in done
        for i in (*j.inputs, *([j.base] if j.base else []))
    )
    return MergeResult(target, merge_plan, elapsed, tuple(files), len(done), commit_url, skipped)


@contextlib.contextmanager
def _writing(target: Path) -> Iterator[None]:
    """An OSError while the output's own files (index, companions, card, manifest) are written, as an
    :class:`OutputError` whose hint says the merged shards are kept for a resume."""
    try:
        yield
    except HubmergeError:
        raise
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        raise OutputError(
            f"writing the output {target} failed: {exc.strerror or exc}{where}",
            path=str(target),
            hint=("free some space, then " if full else "fix the cause, then ")
            + "rerun with --resume: the merged shards are kept",
        ) from None


TOKENIZER_FILES = ("tokenizer", "vocab.", "spiece.model", "spm.model", "merges.txt", "sentencepiece")


def finish_output(
    plan: MergePlan,
    sources: list[TensorSource],
    dest: Path,
    *,
    out_name: str,
    repo_id: str | None = None,
    revision: str | None = None,
    license_: dict[str, str] | None = None,
) -> list[str]:
    """Write the index, companion files, model card and manifest next to the shards.

    Returns:
        Every file of the output, relative to ``dest``.
    """
    from .card import front_matter, render_card
    from .companions import companion_source, copy_companions, read_config

    recipe = plan.recipe
    files = [s.filename for s in plan.shards]
    if len(plan.shards) > 1:
        weight_map = {plan.jobs[j].name: s.filename for s in plan.shards for j in s.jobs}
        write_json(
            dest / "model.safetensors.index.json",
            {
                "metadata": {
                    "total_size": plan.total_size,
                    "hubmerge_version": __version__,
                    "recipe_sha256": plan.recipe_sha256,
                },
                "weight_map": weight_map,
            },
        )
        files.append("model.safetensors.index.json")
    origin = companion_source(sources, len(recipe.models), recipe.base is not None)
    files += copy_companions(origin, dest, model_dtype=plan.model_dtype)
    config = read_config(dest / "config.json") if (dest / "config.json").exists() else None
    tokenizer = any(
        Path(name).name.startswith(TOKENIZER_FILES) or name.endswith((".tiktoken", ".model"))
        for name in files
    )
    meta = front_matter(
        plan,
        license_=license_,
        config=config,
        sentence_transformers=(dest / "modules.json").exists(),
        repo_id=repo_id,
    )
    (dest / "README.md").write_text(
        render_card(plan, meta, out_name=out_name, repo_id=repo_id, revision=revision, tokenizer=tokenizer),
        encoding="utf-8",
    )
    files.append("README.md")
    header = f"# made with hubmerge {__version__}; rerun with `hubmerge recipe.yaml --out DIR`\n"
    (dest / "recipe.yaml").write_text(header + recipe.to_yaml(), encoding="utf-8")
    files.append("recipe.yaml")
    files.append(MANIFEST)
    write_json(dest / MANIFEST, manifest(plan, files))
    return files


def manifest(plan: MergePlan, files: list[str] | None = None) -> dict[str, Any]:
    """What was merged, pinned: recipe, sources with commits, output files. No timestamps (deterministic).

    ``files``: every file of the output, which ``--force`` may replace (writer.check_output keeps anything
    else there from being deleted).
    """
    return {
        "hubmerge_version": __version__,
        "recipe": plan.recipe.model_dump(mode="json", exclude_defaults=True),
        "recipe_sha256": plan.recipe_sha256,
        "plan_fingerprint": plan.fingerprint(),
        "method": plan.method,
        "sources": [{"label": s.label, "ref": s.ref.shown(), "commit": s.commit} for s in plan.sources],
        "shards": {s.filename: s.size for s in plan.shards},
        "tensors": len(plan.jobs),
        "skipped": list(plan.skipped),
        **({"files": sorted(files)} if files is not None else {}),
    }
