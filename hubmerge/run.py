"""The one loop: for each planned tensor, read the inputs, merge, cast, and hand the result to the sinks.

Reads are memory-mapped views (local) or ranged reads (Hub); the next tensor is prefetched while this one is
merged, and a writer thread drains results to the sinks so disk writes overlap the math. Memory stays at one
tensor (or one row chunk of one) per input, plus at most ``WRITE_QUEUE`` results waiting to be written.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .errors import MergeError
from .methods import MethodSpec, get_method
from .plan import WRITE_QUEUE, Job, MergePlan
from .sources import TensorSource
from .sources.tensors import TORCH_DTYPES
from .writer import Sink

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


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
        progress: called with the number of input bytes consumed after each chunk.

    Raises:
        MergeError: integer tensors disagree across models, or a method failed on a tensor.
    """
    spec = get_method(plan.method)
    compute = TORCH_DTYPES["F64" if plan.compute_dtype == "float64" else "F32"]
    left = [sum(plan.jobs[j].name not in done for j in shard.jobs) for shard in plan.shards]
    pending: deque[Future[None]] = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="hubmerge-writer") as writer:
        for shard, remaining in enumerate(left):
            if remaining == 0:  # finished by an earlier run: tell the sinks (an uploader may still need it)
                pending.append(writer.submit(_shard_done, sinks, shard))
        try:
            for index, job in enumerate(plan.jobs):
                if job.name in done:
                    if progress:
                        progress(_input_bytes(job))
                    continue
                if index + 1 < len(plan.jobs):
                    _prefetch(plan.jobs[index + 1], sources)
                for row, result, consumed in _results(job, spec, sources, compute, device):
                    pending.append(writer.submit(_deliver, sinks, job, row, result))
                    while len(pending) > WRITE_QUEUE:
                        pending.popleft().result()
                    if progress:
                        progress(consumed)
                left[job.shard] -= 1
                pending.append(writer.submit(_finish, sinks, job, left[job.shard] == 0))
            while pending:
                pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _deliver(sinks: Sequence[Sink], job: Job, row: int, data: torch.Tensor) -> None:
    for sink in sinks:
        sink.write(job, row, data)


def _finish(sinks: Sequence[Sink], job: Job, shard_complete: bool) -> None:
    for sink in sinks:
        sink.tensor_done(job)
        if shard_complete:
            sink.shard_done(job.shard)


def _shard_done(sinks: Sequence[Sink], shard: int) -> None:
    for sink in sinks:
        sink.shard_done(shard)


def _prefetch(job: Job, sources: Sequence[TensorSource]) -> None:
    for src, info in zip(job.sources, job.inputs, strict=True):
        sources[src].prefetch([info])
    if job.base is not None and job.base_source is not None:
        sources[job.base_source].prefetch([job.base])


def _input_bytes(job: Job) -> int:
    return sum(i.nbytes for i in job.inputs) + (job.base.nbytes if job.base else 0)


def _row_ranges(job: Job) -> Iterator[tuple[int, int] | None]:
    if job.chunk_rows is None:
        yield None
        return
    for start in range(0, job.shape[0], job.chunk_rows):
        yield (start, min(start + job.chunk_rows, job.shape[0]))


def _results(
    job: Job, spec: MethodSpec, sources: Sequence[TensorSource], compute: torch.dtype, device: str
) -> Iterator[tuple[int, torch.Tensor, int]]:
    """Yield (first row, output tensor on the CPU, input bytes consumed) for each chunk of ``job``."""
    out_dtype = TORCH_DTYPES[job.dtype]
    if job.action == "copy":
        first = sources[job.sources[0]].read(job.inputs[0])
        for src, info in zip(job.sources[1:], job.inputs[1:], strict=True):
            if not torch.equal(first, sources[src].read(info)):
                raise MergeError(
                    f"integer tensor '{job.name}' differs between {sources[job.sources[0]].label} and "
                    f"{sources[src].label}; integer tensors are copied, never averaged",
                    tensor=job.name,
                    hint=f"add a rule `- {{tensors: '{job.name}', take: N}}` to pick one model's values",
                )
        yield 0, first.to(out_dtype), _input_bytes(job)
        return
    for chunk, rows in enumerate(_row_ranges(job)):
        tensors = [
            sources[s].read(i, rows).to(device=device, dtype=compute)
            for s, i in zip(job.sources, job.inputs, strict=True)
        ]
        kwargs = dict(job.params)
        consumed = sum(
            t.numel() * i.nbytes // max(i.numel, 1) for t, i in zip(tensors, job.inputs, strict=True)
        )
        if spec.needs_base:
            assert job.base is not None and job.base_source is not None  # guaranteed by build_plan
            kwargs["base"] = sources[job.base_source].read(job.base, rows).to(device=device, dtype=compute)
            consumed += kwargs["base"].numel() * job.base.nbytes // max(job.base.numel, 1)
        if spec.random:
            generator = torch.Generator(device=device)
            generator.manual_seed((job.seed + chunk * 1_000_003) % (1 << 63))
            kwargs["generator"] = generator
        try:
            result = spec.fn(tensors, **kwargs)
        except (ValueError, RuntimeError) as exc:
            raise MergeError(
                f"method '{spec.name}' failed on tensor '{job.name}': {exc}", tensor=job.name
            ) from exc
        yield (rows[0] if rows else 0), result.to(dtype=out_dtype, device="cpu"), consumed
