"""Tensor sources: where a model's tensors come from (a local directory or file, the Hub, memory).

Every source exposes its tensors' headers up front (:attr:`TensorSource.tensors`) and reads tensor bytes only
when asked, so a plan can be built and checked before any weight is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from ..refs import ModelRef
from .header import TensorInfo

if TYPE_CHECKING:
    import torch

__all__ = ["TensorInfo", "TensorSource", "open_source"]


class TensorSource(Protocol):
    """One model's tensors. Reads return tensors in their stored dtype; callers never mutate them."""

    ref: ModelRef
    label: str
    commit: str | None  # the pinned commit SHA of a Hub source; None for local sources
    # Local sources also have ``stamp``: their weight files' sizes and modification times, hashed.
    cached: bool  # a Hub source whose tensors are read from the local Hugging Face cache

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        """Every tensor's header entry, by name (no tensor bytes read)."""
        ...

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Return the tensor (or rows ``[a, b)`` of its first dimension), without copying where possible."""
        ...

    def prefetch(self, infos: Sequence[TensorInfo], rows: tuple[int, int] | None = None) -> None:
        """Hint that these tensors are read next, so I/O can start early. May do nothing.

        ``rows`` are the rows the run reads first of each tensor it reads in parts (None: whole tensors).
        """
        ...

    def keep(self, infos: Sequence[TensorInfo]) -> None:
        """Hint that these tensors are read more than once (statistics passes): keep their bytes.

        A source that would download them again keeps them instead, until :meth:`drop`. Calls nest.
        """
        ...

    def drop(self, infos: Sequence[TensorInfo]) -> None:
        """The run is done with tensors it asked to :meth:`keep`."""
        ...

    def files(self) -> list[str]:
        """Relative paths of every file the model has (for config and tokenizer files)."""
        ...

    def fetch(self, filename: str) -> Path | None:
        """Return a local path holding ``filename`` (downloading it if needed), or None if absent."""
        ...

    def close(self) -> None:
        """Release files and connections."""
        ...


def open_source(
    ref: ModelRef,
    *,
    label: str,
    transfer: Literal["ranges", "shards"] = "ranges",
    token: str | None = None,
) -> TensorSource:
    """Open a model's headers.

    Args:
        ref: where the model lives.
        label: short name for messages (``models.0``, ``base``).
        transfer: how Hub sources read tensors: ranged requests, or one downloaded shard at a time.
        token: the Hub token to read with (default: huggingface_hub's, from ``HF_TOKEN`` or a login).

    A Hub model whose weight files are all in the local Hugging Face cache at the resolved commit is read
    there; with ``HF_HUB_OFFLINE`` set, it is read from the cached snapshot the revision resolves to.

    Returns:
        An open source; close it when done.

    Raises:
        SourceError: the model cannot be found or read.
    """
    if ref.path is not None:
        from .local import LocalSource

        return LocalSource(ref, label=label)
    from .hub import HubSource, offline, open_cached

    if offline():
        return open_cached(ref, label=label)
    return HubSource(ref, label=label, transfer=transfer, token=token)
