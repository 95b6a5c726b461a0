"""The output layout: which shard each tensor goes to, the exact header bytes of each shard, byte offsets,
row chunks, and memory estimates. Pure functions of the planned tensors; no I/O.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from . import __version__
from .sources.header import DTYPE_SIZES, TensorInfo

# How the run loop cuts a tensor (hubmerge/run.py); here so that planning can estimate memory without torch.
BLOCK = 1 << 18  # elements per merge step: 1 MiB per float32 buffer, so a step's buffers stay in L2
BATCH_BYTES = 1 << 20  # output bytes per batch: one task for a worker, one write, still in cache when written
# Input bytes per read of one input (a view of a local file; a download from the Hub). 16 MiB, not 64: the
# same speed or better for every method, and a Hub merge holds 220 MB less (bench/RESULTS.md item 20).
READ_BYTES = 16 << 20
WRITE_QUEUE = 2  # merged batches waiting for the writer thread


@dataclass(frozen=True)
class Job:
    """One output tensor: what to read, what to do, where its bytes go.

    ``inputs[i]`` is read from ``plan.sources[sources[i]]``; for ``merge`` they are the models in order, for
    ``copy`` the first input is written and any others must hold equal values (integer buffers).
    """

    name: str
    action: Literal["merge", "copy"]
    inputs: tuple[TensorInfo, ...]
    sources: tuple[int, ...]
    base: TensorInfo | None
    base_source: int | None
    params: dict[str, Any]
    dtype: str
    shape: tuple[int, ...]
    shard: int
    offset: int
    nbytes: int
    chunk_rows: int | None
    seed: int

    def reads(self) -> list[tuple[int, TensorInfo]]:
        """``(source index, tensor)`` for every tensor the job reads: the inputs in order, then the base (set
        only for methods that take one)."""
        pairs = list(zip(self.sources, self.inputs, strict=True))
        if self.base is not None and self.base_source is not None:
            pairs.append((self.base_source, self.base))
        return pairs


@dataclass(frozen=True)
class Shard:
    """An output file: its name, the exact header bytes that start it, and its total size."""

    filename: str
    header: bytes
    size: int
    jobs: tuple[int, ...]


def lay_out(
    specs: list[dict[str, Any]], sha: str, max_shard: int, seed: int
) -> tuple[list[Job], list[Shard]]:
    """Group planned tensors into shards of at most ``max_shard`` bytes (a bigger tensor gets its own shard),
    in the given order, and fix each shard's header bytes and each tensor's absolute offset.

    Returns:
        The jobs, in output order, and the shards.
    """
    groups: list[list[dict[str, Any]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = _numel(spec["inputs"][0].shape) * DTYPE_SIZES[spec["dtype"]]
        spec["nbytes"] = nbytes
        if groups[-1] and size + nbytes > max_shard:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    count = len(groups)
    jobs: list[Job] = []
    shards: list[Shard] = []
    metadata = {"format": "pt", "hubmerge_version": __version__, "recipe_sha256": sha}
    for s, group in enumerate(groups):
        filename = "model.safetensors" if count == 1 else f"model-{s + 1:05d}-of-{count:05d}.safetensors"
        entries: dict[str, Any] = {"__metadata__": metadata}
        begin = 0
        for spec in group:
            entries[spec["name"]] = {
                "dtype": spec["dtype"],
                "shape": list(spec["inputs"][0].shape),
                "data_offsets": [begin, begin + spec["nbytes"]],
            }
            spec["data_offset"] = begin
            begin += spec["nbytes"]
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the spec pads the header with spaces to an 8-byte boundary
        header = len(text).to_bytes(8, "little") + text
        first = len(jobs)
        for spec in group:
            jobs.append(
                Job(
                    name=spec["name"],
                    action=spec["action"],
                    inputs=spec["inputs"],
                    sources=spec["sources"],
                    base=spec.get("base"),
                    base_source=spec.get("base_source"),
                    params=spec["params"],
                    dtype=spec["dtype"],
                    shape=spec["inputs"][0].shape,
                    shard=s,
                    offset=len(header) + spec["data_offset"],
                    nbytes=spec["nbytes"],
                    chunk_rows=None,
                    seed=tensor_seed(seed, spec["name"]),
                )
            )
        shards.append(Shard(filename, header, len(header) + begin, tuple(range(first, len(jobs)))))
    return jobs, shards


def tensor_seed(seed: int, name: str) -> int:
    """A seed from (recipe seed, tensor name): random methods never depend on processing order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def with_chunks(job: Job, compute_size: int, budget: int, blockwise: bool) -> Job:
    """The job with ``chunk_rows`` set when its compute buffers would exceed ``budget`` bytes (the run loop
    then caps its batches at that many rows)."""
    if job.action != "merge" or not blockwise or len(job.shape) == 0 or job.shape[0] < 2:
        return job
    buffers = len(job.inputs) + (job.base is not None) + 2
    row = _numel(job.shape[1:]) * compute_size * buffers
    if row * job.shape[0] <= budget:
        return job
    rows = max(1, budget // max(row, 1))
    return Job(**{**job.__dict__, "chunk_rows": int(rows)})


def working_set(
    job: Job, compute_size: int, *, workers: int, hub_inputs: int, blockwise: bool, repeated: bool = False
) -> int:
    """Estimated anonymous memory while merging ``job``, beyond the interpreter's and torch's own.

    Blockwise methods hold a few block-sized buffers per worker and a few output batches, whatever the tensor
    size; other methods (and tensors of at most one block) hold every input and the result in the compute
    dtype. Each Hub input (``hub_inputs``, the base included) adds the read of up to ``READ_BYTES`` merging,
    one more for each large tensor with rows on their way, and the window of smaller tensors read ahead; with
    statistics passes (``repeated``), also a kept tensor read whole (``sources.hub``: larger ones are kept
    in a scratch file). Local inputs are memory-mapped. The writer's staging buffers for direct writes
    (directio.py) come on top; a push reading its shards back around the page cache holds as many again,
    which this estimate, made before the push is known, leaves out.
    """
    from .directio import DEPTH, STAGE
    from .sources.hub import AHEAD_BYTES, AHEAD_TENSORS, PREFETCH_LIMIT, SPAN_BYTES

    numel = _numel(job.shape)
    inputs = len(job.inputs) + (job.base is not None)
    largest = max(i.nbytes for i in job.inputs)
    per_input = (1 + AHEAD_TENSORS) * min(READ_BYTES, largest) + AHEAD_BYTES + SPAN_BYTES
    if repeated:
        per_input += min(PREFETCH_LIMIT, largest)
    buffers = hub_inputs * per_input
    buffers += DEPTH * STAGE
    if job.action == "copy":
        return buffers
    if blockwise and numel > BLOCK:
        per_worker = (inputs + 8) * BLOCK * compute_size
        return workers * per_worker + (WRITE_QUEUE + 2 * workers) * BATCH_BYTES + buffers
    return (inputs + 2) * numel * compute_size + buffers
