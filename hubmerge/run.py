"""The one loop: for each planned tensor, read the inputs, merge, cast, and hand the result to the sinks.

A tensor is merged in *blocks* of about ``BLOCK`` elements, so the float32 temporaries of one block stay in
the core's cache instead of streaming through memory once per arithmetic step; the blocks of a *batch* (about
``BATCH_BYTES`` of output) are merged by a pool of worker threads, one torch thread each, into the batch's
output buffer, which a writer thread hands to the sinks while the next batch is merged. Reads are
memory-mapped views (local) or ranged reads (Hub). Memory is a few blocks per worker plus at most
``WRITE_QUEUE + 1`` batches, whatever the size of the tensor.

Methods that are not elementwise but have ``passes`` (TIES, SLERP, Model Stock) read the tensor block by block
first to find their whole-tensor quantities, then merge block by block like the others. Random methods draw
from a generator seeded per block from (tensor seed, block index); blocks depend only on the tensor's shape,
so the bytes never depend on the memory budget, the batch size or the number of threads.
"""

from __future__ import annotations

import gc
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

from . import kernels
from ._torch import torch
from .errors import MergeError, raise_if_stopped
from .layout import BATCH_BYTES, BLOCK, READ_BYTES, WRITE_QUEUE
from .methods import MethodSpec, Pass, get_method
from .plan import Job, MergePlan
from .sources import TensorSource, buffers
from .sources.buffers import retain_freed_memory
from .writer import Sink

log = logging.getLogger(__name__)

Progress = Callable[[int], object]  # what it returns is ignored (a tqdm bar's update returns a bool)
T = TypeVar("T")

SEED_STRIDE = 1_000_003  # block k of a tensor draws from seed + k * SEED_STRIDE
EARLY_READ_BYTES = 128 << 20  # start_reads asks for the first tensors up to about this much per model


@dataclass(frozen=True)
class _Context:
    spec: MethodSpec
    sources: Sequence[TensorSource]
    compute: torch.dtype
    device: str
    pool: ThreadPoolExecutor | None
    workers: int
    kernels: bool  # fused CPU kernels may run (see hubmerge.kernels); each call may still decline


def execute(
    plan: MergePlan,
    sources: Sequence[TensorSource],
    sinks: Sequence[Sink],
    *,
    done: frozenset[str] = frozenset(),
    device: str = "cpu",
    progress: Progress | None = None,
) -> None:
    """Run every job of ``plan`` that is not in ``done``, feeding results to ``sinks``.

    Args:
        plan: the merge plan.
        sources: open sources, indexed like ``plan.sources``.
        sinks: receivers of merged tensors, called from one writer thread in job order.
        done: names of tensors already written (resume).
        device: where the arithmetic runs (``cpu`` or ``cuda``).
        progress: called with the number of input bytes consumed after each batch.

    Raises:
        MergeError: integer tensors disagree across models, or a method failed on a tensor.
    """
    spec = get_method(plan.method)
    compute = _torch_dtype("F64" if plan.compute_dtype == "float64" else "F32")
    workers = max(1, torch.get_num_threads()) if device == "cpu" else 1
    left = [sum(plan.jobs[j].name not in done for j in shard.jobs) for shard in plan.shards]
    pending: deque[Future[None]] = deque()
    with (
        ThreadPoolExecutor(1, thread_name_prefix="hubmerge-writer") as writer,
        ThreadPoolExecutor(
            workers, thread_name_prefix="hubmerge-merge", initializer=_one_torch_thread
        ) as pool,
    ):
        fused = device == "cpu" and compute == torch.float32 and kernels.available()
        arithmetic = f"fused CPU kernels ({kernels.variant()})" if fused else f"torch on {device}"
        log.debug("arithmetic: %s", arithmetic)
        ctx = _Context(spec, sources, compute, device, pool if workers > 1 else None, workers, fused)
        threads = torch.get_num_threads()  # this thread's (OpenMP keeps one per thread): put back after
        retain_freed_memory(True)  # only where the process is ours (buffers.OWN_PROCESS), as the collector
        collecting = buffers.OWN_PROCESS and gc.isenabled()
        if collecting:
            gc.disable()  # the loop makes no reference cycles; collections would stall every thread
        try:
            if workers > 1:
                _one_torch_thread()  # this thread only sums statistics and merges small tensors
            for shard, remaining in enumerate(left):
                if (
                    remaining == 0
                ):  # finished by an earlier run: the sinks still hear of it (an upload may be due)
                    pending.append(writer.submit(_shard_done, sinks, shard))
            if progress:  # first, in one call, what an earlier run merged (0 if none): a rate leaves it out
                progress(sum(_input_bytes(job) for job in plan.jobs if job.name in done))
            first = next((job for job in plan.jobs if job.name not in done), None)
            if first is not None:  # later jobs are prefetched while the one before them merges
                _prefetch(first, spec, sources, device)
            for index, job in enumerate(plan.jobs):
                raise_if_stopped()
                if job.name in done:
                    continue
                # a skipped job's prefetch would never be read
                if index + 1 < len(plan.jobs) and plan.jobs[index + 1].name not in done:
                    _prefetch(plan.jobs[index + 1], spec, sources, device)
                for row, result, consumed in _results(job, ctx):
                    raise_if_stopped()  # a stop signal's exception lost in a finalizer (errors.py)
                    pending.append(writer.submit(_deliver, sinks, job, row, result))
                    while len(pending) > WRITE_QUEUE:
                        pending.popleft().result()
                    if progress:
                        progress(consumed)
                _tell(job, sources, "release")  # mapped files: out of the resident size
                left[job.shard] -= 1
                pending.append(writer.submit(_finish, sinks, job, left[job.shard] == 0))
            while pending:
                pending.popleft().result()
        finally:
            torch.set_num_threads(threads)
            retain_freed_memory(False)
            if collecting:
                gc.enable()
            for future in pending:
                future.cancel()


def start_reads(
    plan: MergePlan,
    sources: Sequence[TensorSource],
    *,
    done: frozenset[str] = frozenset(),
    device: str = "cpu",
) -> None:
    """Ask the sources for the first tensors :func:`execute` will read, up to ``EARLY_READ_BYTES`` per model.

    Needs no torch: called before :func:`execute`, Hub reads download on their own threads while this
    thread imports torch (1-2 s), instead of starting when the loop does. Local sources only advise the
    kernel. Safe to skip; :func:`execute` asks for what is not on its way.
    """
    spec = get_method(plan.method)
    retain_freed_memory(True)  # the read buffers are malloc'd now; execute() keeps this and resets it
    asked = 0
    for job in plan.jobs:
        if job.name in done:
            continue
        rows = _prefetch(job, spec, sources, device)
        largest = max(info.nbytes for info in job.inputs)
        asked += largest if rows is None else largest * (rows[1] - rows[0]) // max(job.shape[0], 1)
        if asked >= EARLY_READ_BYTES:
            break


def _one_torch_thread() -> None:
    # The pool is the parallelism: one intra-op thread per worker avoids fork-join on every small op.
    torch.set_num_threads(1)


def _shard_done(sinks: Sequence[Sink], shard: int) -> None:
    for sink in sinks:
        sink.shard_done(shard)


def _deliver(sinks: Sequence[Sink], job: Job, row: int, data: torch.Tensor) -> None:
    for sink in sinks:
        sink.write(job, row, data)


def _finish(sinks: Sequence[Sink], job: Job, shard_complete: bool) -> None:
    for sink in sinks:
        sink.tensor_done(job)
        if shard_complete:
            sink.shard_done(job.shard)


def _prefetch(
    job: Job, spec: MethodSpec, sources: Sequence[TensorSource], device: str
) -> tuple[int, int] | None:
    """Ask the sources for the rows of ``job`` the loop reads first (:func:`_first_rows`); return them."""
    rows = _first_rows(job, spec, device)
    for src, info in job.reads():
        sources[src].prefetch([info], rows)
    return rows


def _first_rows(job: Job, spec: MethodSpec, device: str) -> tuple[int, int] | None:
    """The rows of each input the loop reads first (as ``_copy`` and ``_batches`` cut them); None: whole."""
    if not job.shape:
        return None
    if job.action == "copy":
        step = _grid(job, "cpu").batch
    elif math.prod(job.shape) > BLOCK and spec.blockwise:
        step = _grid(job, device).read
    else:
        return None
    return 0, min(step, job.shape[0])


def _torch_dtype(name: str) -> torch.dtype:
    from .sources.tensors import TORCH_DTYPES  # imports torch: not before the loop needs it

    return TORCH_DTYPES[name]


def _input_bytes(job: Job) -> int:
    return sum(i.nbytes for i in job.inputs) + (job.base.nbytes if job.base else 0)


@dataclass(frozen=True)
class _Grid:
    """How a tensor's rows are cut: blocks (the cache unit) inside batches (the unit of work and of writes)
    inside reads (one ``read`` per input). Blocks depend only on the shape, so random draws do too."""

    block: int
    batch: int
    read: int


def _grid(job: Job, device: str) -> _Grid:
    row_elems = math.prod(job.shape[1:])
    out_row = max(1, job.nbytes // max(job.shape[0], 1))
    in_row = max(1, max(i.nbytes for i in job.inputs) // max(job.shape[0], 1))
    block = max(1, BLOCK // max(row_elems, 1))
    per_batch = max(1, BATCH_BYTES // (block * out_row))
    if job.chunk_rows is not None:  # the plan's memory budget
        per_batch = min(per_batch, max(1, job.chunk_rows // block))
    if device != "cpu":
        block *= per_batch  # a GPU wants big steps; its memory is not the cache we are saving
        per_batch = 1
    batch = block * per_batch
    return _Grid(block, batch, batch * max(1, READ_BYTES // (batch * in_row)))


def _spans(total: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, step):
        yield start, min(start + step, total)


@dataclass(frozen=True)
class _Batch:
    """Rows ``[at, at + len)`` of a tensor: views of its inputs and, when merging, its output buffer."""

    at: int
    views: list[torch.Tensor]
    base: torch.Tensor | None
    out: torch.Tensor | None


def _results(job: Job, ctx: _Context) -> Iterator[tuple[int, torch.Tensor, int]]:
    """Yield (first row, output tensor on the CPU, input bytes consumed) for each batch of ``job``."""
    if job.action == "copy":
        yield from _copy(job, ctx)
        return
    spec = ctx.spec
    numel = math.prod(job.shape)
    if not job.shape or numel <= BLOCK or not spec.blockwise:
        yield 0, _merge_whole(job, ctx), _input_bytes(job)
        return
    grid = _grid(job, ctx.device)
    kwargs: dict[str, Any] = dict(job.params)
    # Statistics passes read the inputs again: sources that would download them twice keep them instead.
    repeated = not spec.elementwise and any(p.active(kwargs) for p in spec.passes)
    if repeated:
        _tell(job, ctx.sources, "keep")
    try:
        yield from _blocked(job, ctx, grid, kwargs)
    finally:
        if repeated:
            _tell(job, ctx.sources, "drop")


def _tell(job: Job, sources: Sequence[TensorSource], what: str) -> None:
    """Call ``what`` of each source of ``job``'s inputs with that input, where the source has it: ``keep``
    their bytes across a method's passes, ``drop`` them after, ``release`` a merged tensor's mapped pages."""
    for src, info in job.reads():
        tell = getattr(sources[src], what, None)
        if tell is not None:
            tell([info])


def _blocked(
    job: Job, ctx: _Context, grid: _Grid, kwargs: dict[str, Any]
) -> Iterator[tuple[int, torch.Tensor, int]]:
    """:func:`_results` for a tensor merged in blocks: the method's passes, then the merge."""
    spec = ctx.spec
    fn = spec.fn
    numel = math.prod(job.shape)
    if not spec.elementwise:
        assert spec.block_fn is not None  # blockwise and not elementwise
        for p in spec.passes:
            if not p.active(kwargs):
                continue
            total: torch.Tensor | None = None
            # Statistics need no output buffer, so a pass takes bigger batches: a few per worker and read.
            stats = replace(
                grid, batch=max(grid.batch, grid.read // (2 * ctx.workers) // grid.block * grid.block)
            )
            step = partial(_stats_batch, p, kwargs, ctx, stats)
            for _, part in _ordered(ctx, step, _batches(job, ctx, stats, None)):
                if part is not None:
                    total = part if total is None else total.add_(part)
            assert total is not None
            kwargs |= p.finish(total, numel, ctx.compute, kwargs)
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        fn = spec.block_fn
    row_bytes = _input_bytes(job) // job.shape[0]
    merge = partial(_merge_batch, job, fn, kwargs, ctx, grid)
    for batch, _ in _ordered(ctx, merge, _batches(job, ctx, grid, _torch_dtype(job.dtype))):
        assert batch.out is not None
        yield batch.at, batch.out, batch.out.shape[0] * row_bytes


def _batches(job: Job, ctx: _Context, grid: _Grid, out_dtype: torch.dtype | None) -> Iterator[_Batch]:
    """The batches of ``job`` in order, reading the inputs a few batches at a time."""
    for start, stop in _spans(job.shape[0], grid.read):
        views, base = _read(job, ctx, (start, stop))
        for a, b in _spans(stop - start, grid.batch):
            out = torch.empty((b - a, *job.shape[1:]), dtype=out_dtype) if out_dtype else None
            yield _Batch(start + a, [v[a:b] for v in views], base[a:b] if base is not None else None, out)


def _ordered(
    ctx: _Context, fn: Callable[[_Batch], Any], batches: Iterator[_Batch]
) -> Iterator[tuple[_Batch, Any]]:
    """``(batch, fn(batch))`` in order, computed on the pool with a few batches in flight."""
    if ctx.pool is None:
        for batch in batches:
            yield batch, fn(batch)
        return
    window = 2 * ctx.workers
    flight: deque[tuple[_Batch, Future[Any]]] = deque()
    try:
        for batch in batches:
            flight.append((batch, ctx.pool.submit(fn, batch)))
            if len(flight) >= window:
                done, future = flight.popleft()
                yield done, future.result()
        while flight:
            done, future = flight.popleft()
            yield done, future.result()
    finally:
        for _, future in flight:
            future.cancel()


def _stats_batch(
    p: Pass, kwargs: dict[str, Any], ctx: _Context, grid: _Grid, batch: _Batch
) -> torch.Tensor | None:
    """The sum of ``p.step`` over the batch's blocks."""
    if ctx.kernels and p.kernel is not None:
        fused = p.kernel(batch.views, batch.base, kwargs)
        if fused is not None:
            return fused
    total: torch.Tensor | None = None
    for span in _spans(batch.views[0].shape[0], grid.block):
        tensors, base = _block(batch.views, batch.base, span, ctx)
        part = p.step(tensors, base, kwargs)
        total = part if total is None else total.add_(part)
    return total


def _merge_batch(
    job: Job,
    fn: Callable[..., torch.Tensor],
    kwargs: dict[str, Any],
    ctx: _Context,
    grid: _Grid,
    batch: _Batch,
) -> None:
    """Merge a batch block by block into its output buffer; a random method draws per block."""
    assert batch.out is not None
    if ctx.kernels and ctx.spec.kernel is not None:
        fused = kwargs
        if ctx.spec.random:  # the kernel draws per block as below
            seeds = [
                _block_seed(job, (batch.at + a) // grid.block)
                for a, _ in _spans(batch.out.shape[0], grid.block)
            ]
            fused = kwargs | {"_seeds": seeds, "_block": grid.block}
        if _call(job, ctx.spec.name, ctx.spec.kernel, batch.views, batch.base, batch.out, fused):
            return
    for span in _spans(batch.out.shape[0], grid.block):
        tensors, base = _block(batch.views, batch.base, span, ctx)
        block_kwargs = dict(kwargs)
        if base is not None:
            block_kwargs["base"] = base
        if ctx.spec.random:
            generator = torch.Generator(device=ctx.device)
            generator.manual_seed(_block_seed(job, (batch.at + span[0]) // grid.block))
            block_kwargs["generator"] = generator
        batch.out[span[0] : span[1]].copy_(_call(job, ctx.spec.name, fn, tensors, **block_kwargs))


def _block_seed(job: Job, index: int) -> int:
    """The seed of block ``index`` of ``job`` (random methods): blocks depend on the shape alone."""
    return (job.seed + index * SEED_STRIDE) % (1 << 63)


def _read(
    job: Job, ctx: _Context, rows: tuple[int, int] | None
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The inputs' rows (None: the scalars), and the base's when the method takes one.

    A source that serves two of them (a base also listed among the models, as mergekit's examples do) is read
    once: a Hub source would download the bytes twice.
    """
    read: dict[tuple[int, str], torch.Tensor] = {}
    views = []
    for src, info in job.reads():
        source = ctx.sources[src]
        key = (id(source), info.name)
        if key not in read:
            read[key] = source.read(info, rows)
        views.append(read[key])
    if job.base is None:
        return views, None
    return views[:-1], views[-1]


def _block(
    views: list[torch.Tensor], base: torch.Tensor | None, span: tuple[int, int], ctx: _Context
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    a, b = span
    tensors = [v[a:b].to(device=ctx.device, dtype=ctx.compute) for v in views]
    return tensors, (base[a:b].to(device=ctx.device, dtype=ctx.compute) if base is not None else None)


def _call(job: Job, method: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, its errors reported as the method failing on the job's tensor."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, RuntimeError) as exc:
        raise MergeError(f"method '{method}' failed on tensor '{job.name}': {exc}", tensor=job.name) from exc


def _merge_whole(job: Job, ctx: _Context) -> torch.Tensor:
    """A tensor in one step: small ones, and methods that need the whole tensor at once."""
    views, base = _read(job, ctx, (0, job.shape[0]) if job.shape else None)
    tensors = [v.to(device=ctx.device, dtype=ctx.compute) for v in views]
    kwargs: dict[str, Any] = dict(job.params)
    if base is not None:
        kwargs["base"] = base.to(device=ctx.device, dtype=ctx.compute)
    if ctx.spec.random:
        generator = torch.Generator(device=ctx.device)
        generator.manual_seed(job.seed % (1 << 63))
        kwargs["generator"] = generator
    result = _call(job, ctx.spec.name, ctx.spec.fn, tensors, **kwargs)
    return result.to(dtype=_torch_dtype(job.dtype), device="cpu")


def _copy(job: Job, ctx: _Context) -> Iterator[tuple[int, torch.Tensor, int]]:
    """Copied tensors (integer buffers, ``take`` rules), batch by batch; integer ones must agree."""
    out_dtype = _torch_dtype(job.dtype)
    spans = list(_spans(job.shape[0], _grid(job, "cpu").batch)) if job.shape else [None]
    row_bytes = _input_bytes(job) // job.shape[0] if job.shape else _input_bytes(job)
    for rows in spans:
        first = ctx.sources[job.sources[0]].read(job.inputs[0], rows)
        for src, info in zip(job.sources[1:], job.inputs[1:], strict=True):
            if not torch.equal(first, ctx.sources[src].read(info, rows)):
                raise MergeError(
                    f"integer tensor '{job.name}' differs between {ctx.sources[job.sources[0]].label} and "
                    f"{ctx.sources[src].label}; integer tensors are copied, never averaged",
                    tensor=job.name,
                    hint=f"add a rule `- {{tensors: '{job.name}', take: N}}` to pick one model's values, "
                    "then rerun with --force (a changed recipe starts over)",
                )
        count = rows[1] - rows[0] if rows else 1
        yield (rows[0] if rows else 0), first.to(out_dtype), count * row_bytes
