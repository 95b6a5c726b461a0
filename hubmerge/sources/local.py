"""Local checkpoints: a directory with ``model.safetensors`` or shards + index, or one ``.safetensors`` file.

Shards are memory-mapped; a read returns a tensor viewing the page cache, so reading costs no anonymous memory
until the merge converts it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import HeaderError, SourceError
from ..refs import ModelRef
from .header import TensorInfo, header_length, parse_header, parse_index

if TYPE_CHECKING:
    import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SHARD_NAME = re.compile(r"-\d+-of-(\d+)\.safetensors$")  # one shard of several: model-00001-of-00007
PAGE = mmap.PAGESIZE
log = logging.getLogger(__name__)


def checkpoint_files(root: Path, *, label: str) -> tuple[list[str], dict[str, str] | None]:
    """Find the safetensors files of a local model.

    Returns:
        The shard file names (relative to ``root``) and the index weight map if the model is sharded.

    Raises:
        SourceError: nothing usable there; pickle checkpoints are refused with how to convert them.
    """
    if (root / INDEX).is_file() and (root / SINGLE).is_file():
        # A stale leftover one way or the other; transformers loads the single file, and so do we.
        log.warning(
            "%s: %s holds both %s and %s; reading %s, as transformers does",
            label,
            root,
            SINGLE,
            INDEX,
            SINGLE,
        )
        return [SINGLE], None
    if (root / INDEX).is_file():
        weight_map = parse_index((root / INDEX).read_bytes(), file=str(root / INDEX))
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (root / shard).is_file():
                raise SourceError(
                    f"{label}: {root / INDEX} lists shard '{shard}' but {root / shard} does not exist "
                    "(as a file)",
                    location=str(root),
                    hint="download the missing shard, or regenerate the index",
                )
        return shards, weight_map
    if (root / SINGLE).is_file():
        return [SINGLE], None
    candidates = sorted(p.name for p in root.glob("*.safetensors") if p.is_file())
    if len(candidates) == 1 and is_whole(candidates[0]):
        return candidates, None
    if candidates:
        raise _no_index(root, candidates, label=label)
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise pickle_refused(root / pickles[0], label=label)
    raise SourceError(
        f"{label}: no model.safetensors, {INDEX} or other .safetensors file in {root}",
        location=str(root),
        hint="point the recipe at a directory saved with save_pretrained(safe_serialization=True)",
    )


def is_whole(name: str) -> bool:
    """Whether a lone ``.safetensors`` file can be the whole model: not one shard of several."""
    shard = SHARD_NAME.search(name)
    return shard is None or int(shard[1]) == 1


def _no_index(root: Path, candidates: list[str], *, label: str) -> SourceError:
    """The error for a folder of several ``.safetensors`` files, or of shards, without an index."""
    shards = [name for name in candidates if SHARD_NAME.search(name)]
    counts = {int(m[1]) for m in map(SHARD_NAME.search, shards) if m}
    if not shards:  # unrelated files: one of them may be the model
        return SourceError(
            f"{label}: {root} holds {len(candidates)} .safetensors files ({', '.join(candidates[:4])}) "
            f"but no {INDEX}",
            location=str(root),
            hint=f"add {INDEX}, or point the recipe at the one file that is the model",
        )
    # Shards of one checkpoint (``model-00001-of-00007.safetensors``): each holds a part of the model, and
    # only the index says which tensor is in which. Pointing the recipe at one would merge that part.
    named = ", ".join(shards[:2]) + (", ..." if len(shards) > 2 else "")
    total = max(counts)
    if len(counts) == 1 and len(shards) < total:
        lost = total - len(shards)
        return SourceError(
            f"{label}: {root} holds {len(shards)} of the {total} shards of a checkpoint ({named}) and no "
            f"{INDEX}",
            location=str(root),
            hint=f"the index and {lost} shard{'s' * (lost != 1)} are missing: download the model again "
            "(one shard is only a part of the model)",
        )
    return SourceError(
        f"{label}: {root} holds the {len(shards)} shards of a checkpoint ({named}) but not their {INDEX}",
        location=str(root),
        hint=f"the index is missing: download {INDEX} again, or copy it from where the shards came from, "
        f"into {root} (one shard is only a part of the model)",
    )


def pickle_refused(path: Path, *, label: str) -> SourceError:
    """The error for a pickle checkpoint (``*.bin``, ``*.pt``), with a conversion that keeps its tensor names.

    A transformers checkpoint is loaded by the class its ``config.json`` names (``LlamaForCausalLM``):
    ``AutoModel`` would load the bare backbone and save it without the head and the ``model.`` prefix.
    """
    folder = path.parent
    arch = _architecture(folder / "config.json")
    if arch is not None:
        out = folder.with_name(f"{folder.name}-safetensors")
        hint = (
            f'convert it once with its own class, {arch}: python -c "from transformers import {arch}; '
            f"{arch}.from_pretrained({str(folder)!r}, torch_dtype='auto').save_pretrained({str(out)!r})\" "
            "and merge that folder"
        )
    else:
        out = path.with_suffix(".safetensors")
        hint = (
            'convert it once: python -c "import torch; from safetensors.torch import save_file; '
            f"save_file({{k: v.contiguous().clone() for k, v in torch.load({str(path)!r}).items()}}, "
            f'{str(out)!r})" and merge that file'
        )
    return SourceError(
        f"{label}: {path} is a pickle checkpoint; hubmerge reads only safetensors, because unpickling "
        "can run arbitrary code and pickles cannot be memory-mapped tensor by tensor",
        location=str(path),
        hint=hint,
    )


def _architecture(config: Path) -> str | None:
    """The model class a transformers ``config.json`` names (``architectures``), if it is one."""
    try:
        names = json.loads(config.read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return None
    name = names[0] if isinstance(names, list) and names else None
    return name if isinstance(name, str) and name.isidentifier() else None


class LocalSource:
    """A model on local disk, memory-mapped shard by shard."""

    def __init__(
        self, ref: ModelRef, *, label: str, path: Path | None = None, commit: str | None = None
    ) -> None:
        """Open ``ref.path``, or ``path`` with ``commit`` for a Hub model's snapshot in the local cache."""
        path = path or ref.path
        assert path is not None  # open_source dispatches on this
        self.ref = ref
        self.label = label
        self.commit: str | None = commit
        self.cached = ref.path is None  # a Hub model's snapshot in the local cache
        if not path.exists():
            raise SourceError(
                f"{label}: {path} does not exist",
                location=str(path),
                hint="check the path in the recipe (relative paths start at the recipe's directory)",
            )
        if not path.is_file() and not path.is_dir():  # a FIFO would block the first read forever
            raise SourceError(
                f"{label}: {path} is neither a file nor a folder",
                location=str(path),
                hint="point the recipe at a model folder or a .safetensors file",
            )
        if path.is_file():
            if path.suffix in PICKLE_SUFFIXES:
                raise pickle_refused(path, label=label)
            self.root, shards, weight_map = path.parent, [path.name], None
        else:
            self.root = path
            shards, weight_map = checkpoint_files(path, label=label)
        self._maps: dict[str, mmap.mmap] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._stamps: list[str] = []
        try:
            for shard in shards:
                self._open_shard(shard, weight_map)
        except BaseException:
            self.close()
            raise
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise HeaderError(
                    f"{label}: {INDEX} maps '{missing[0]}' to '{weight_map[missing[0]]}', which lacks it "
                    f"({len(missing)} such tensors)",
                    location=str(self.root / INDEX),
                    hint="regenerate the index or re-download the shards",
                )

    @property
    def stamp(self) -> str | None:
        """The weight files' names, sizes and modification times, hashed.

        A file rewritten since changes it, so ``--resume`` refuses to mix tensors of the old and the new
        checkpoint (a Hub source has its commit for that).
        """
        if self.cached:  # a Hub model's snapshot: its commit names it, read online or offline alike
            return None
        return hashlib.sha256("\n".join(self._stamps).encode()).hexdigest()[:16]

    def _open_shard(self, shard: str, weight_map: dict[str, str] | None) -> None:
        file = self.root / shard
        if not file.is_file():  # a folder or a FIFO by the name of a shard (open would block on a FIFO)
            raise SourceError(
                f"{self.label}: {file} is not a regular file",
                location=str(file),
                hint="the model folder is damaged; download or save the model again",
            )
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError as exc:
            raise SourceError(
                f"{self.label}: cannot open {file}: {exc.strerror}", location=str(file)
            ) from None
        try:
            stat = os.fstat(fd)
            size = stat.st_size
            self._stamps.append(f"{shard}:{size}:{stat.st_mtime_ns}")
            n = header_length(os.pread(fd, 8, 0), file=str(file), file_size=size)
            header = parse_header(os.pread(fd, n, 8), file=str(file), file_size=size)
            # ACCESS_COPY maps privately: reads share the page cache and torch gets a writable buffer.
            self._maps[shard] = mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else mmap.mmap(-1, 1)
        finally:
            os.close(fd)
        for name, info in header.tensors.items():
            if weight_map is not None and weight_map.get(name) != shard:
                continue  # the index is authoritative where shards overlap
            if name in self.tensors:
                raise HeaderError(
                    f"{self.label}: tensor '{name}' appears in both {self.tensors[name].file} and {shard}",
                    location=str(file),
                    hint="regenerate the index so each tensor lives in one shard",
                )
            self.tensors[name] = TensorInfo(name, info.dtype, info.shape, shard, info.start, info.end)

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        from .tensors import view_bytes

        return view_bytes(self._maps[info.file], info, rows)

    def prefetch(self, infos: Sequence[TensorInfo], rows: tuple[int, int] | None = None) -> None:
        for info in infos:
            start = info.start - info.start % PAGE
            if info.end > start:
                self._maps[info.file].madvise(mmap.MADV_WILLNEED, start, info.end - start)

    def keep(self, infos: Sequence[TensorInfo]) -> None:
        pass  # mapped files: a second read costs no transfer

    def release(self, infos: Sequence[TensorInfo]) -> None:
        """Unmap the pages of tensors merged (those wholly theirs): they stay in the page cache, but leave the
        process's resident size, which otherwise grew to the inputs' size (20 GB in `top` for three 8B
        models, 200 MB of it the merge's own memory). A page read again is mapped again from the cache."""
        if os.environ.get("HUBMERGE_RELEASE", "1") == "0":
            return
        for info in infos:
            start, end = -(-info.start // PAGE) * PAGE, info.end // PAGE * PAGE
            if end > start:
                self._maps[info.file].madvise(mmap.MADV_DONTNEED, start, end - start)

    def drop(self, infos: Sequence[TensorInfo]) -> None:
        pass

    def files(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def fetch(self, filename: str) -> Path | None:
        path = self.root / filename
        return path if path.is_file() else None

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # a tensor still views it; the mapping goes when that tensor does
        self._maps.clear()
