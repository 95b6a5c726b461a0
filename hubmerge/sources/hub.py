"""Hub checkpoints, streamed: headers by ranged requests, tensors by ranged reads or one shard at a time.

The revision is resolved to a commit SHA when the source opens and every later request names that SHA, so a
run reads the same bytes even if the branch moves. ``transfer="ranges"`` (default) reads each tensor with an
HTTP Range request, a few in flight ahead of the merge, touching no disk; ``transfer="shards"`` downloads one
shard per model at a time into a temporary directory and evicts it when the model moves to its next shard.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from ..directio import DirectReader, writing
from ..errors import (
    EntryNotFoundError,
    GatedRepoError,
    HeaderError,
    HubConnectionError,
    HubError,
    HubmergeError,
    RepoNotFoundError,
    RevisionNotFoundError,
    SourceError,
)
from ..refs import ModelRef
from . import ranged
from .buffers import buffer, writable
from .header import TensorInfo, header_length, parse_header, parse_index
from .local import INDEX, PICKLE_SUFFIXES, SINGLE, LocalSource, is_whole
from .ranged import Fallback

if TYPE_CHECKING:
    import torch

    from .buffers import Buffer

log = logging.getLogger(__name__)

T = TypeVar("T")
Transfer = Literal["ranges", "shards"]
IN_FLIGHT = 4  # ranged reads running ahead of the merge
AHEAD_BYTES = 48 * 2**20  # and at most about this many bytes of them (plus one read), per model
AHEAD_TENSORS = 2  # large tensors with a row range on its way, per model
PREFETCH_LIMIT = 32 * 2**20  # larger tensors are read in the row ranges the run asks for, one range ahead
SPAN_BYTES = 8 * 2**20  # a prefetch also takes the tensors stored right after, up to this many bytes
SPILL_QUEUE = 4  # writes of a kept tensor's reads on their way to its scratch file (_Spill)
CHUNK = 1 << 20
SHARD_PIECE = 64 * CHUNK  # bytes per request of a shard download (transfer="shards")
HEADER_READ = 64 << 10  # a shard's first request: most headers fit, so one round trip per shard


@dataclass
class _Span:
    """One ranged read covering consecutive tensors of a file; dropped once each of them has been read."""

    future: Future[Buffer]
    start: int
    end: int
    last: str  # the name of the last tensor it holds
    unread: set[str]


class _Spill:
    """A tensor read more than once (a method's statistics passes): its bytes go to a file as the first pass
    downloads them, in order, and the later passes map that file instead of downloading them again.

    Written through the page cache by a thread of its own; the file is deleted when the run is done with the
    tensor, often before its pages ever reach the disk. Anything that goes wrong (a full disk, bytes out of
    order) leaves the later passes reading the Hub, as without a spill.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._queued = 0  # bytes [0, _queued) are written or on their way
        self._writes: list[Future[None]] = []
        self._map: mmap.mmap | None = None
        self._failed = False

    def add(self, writer: ThreadPoolExecutor, offset: int, data: Buffer) -> None:
        """Write ``data``, the tensor's bytes from ``offset``, if they continue what is written."""
        if self._failed or offset != self._queued or self._queued >= self.size:
            return
        waiting = [write for write in self._writes if not write.done()]
        if len(waiting) >= SPILL_QUEUE:  # a slow disk must not pile up the reads' buffers
            waiting[0].exception()  # waits; an error shows in mapped()
        self._queued = offset + len(writable(data))
        self._writes.append(writer.submit(self._write, offset, data))

    def _write(self, offset: int, data: Buffer) -> None:
        view, done = writable(data), 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def mapped(self) -> mmap.mmap | None:
        """The whole tensor's bytes, once all are written; None before, or if a write failed."""
        if self._map is not None or self._failed or self._queued < self.size:
            return self._map
        try:
            for write in self._writes:
                write.result()
            # private, as LocalSource maps: reads share the page cache, and torch gets a writable buffer
            self._map = mmap.mmap(self._fd, self.size, access=mmap.ACCESS_COPY)
        except OSError as exc:
            log.debug("%s: cannot keep the bytes on disk (%s); the next passes read the Hub", self.path, exc)
            self._failed = True
        self._writes.clear()
        return self._map

    def close(self) -> None:
        for write in self._writes:
            write.cancel()
        for write in self._writes:
            if not write.cancelled():
                write.exception()  # wait: the thread must not write to a closed descriptor
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a tensor still views it; the mapping goes when that tensor does
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


def retries() -> int:
    """Attempts per request before giving up (``HUBMERGE_HUB_RETRIES``, default 5)."""
    return max(1, int(os.environ.get("HUBMERGE_HUB_RETRIES", "5")))


def hub_call(
    fn: Callable[[], T],
    *,
    repo_id: str,
    revision: str | None,
    what: str,
    attempts: int | None = None,
    cancelled: threading.Event | None = None,
) -> T:
    """Run a Hub request, retrying lost connections and server errors with backoff, mapping errors to ours.

    ``attempts`` defaults to :func:`retries`; calls that already retry inside huggingface_hub pass 1. Once
    ``cancelled`` is set (the source is closing), a failed attempt is the last and a wait for the next ends.

    Raises:
        HubError: a subclass naming the repository, the revision and what to do.
    """
    import httpx2
    from huggingface_hub import errors as hf

    redact_hub_logs()
    where = f"{repo_id}@{revision}" if revision else repo_id
    attempts = attempts or retries()
    for attempt in range(attempts):
        try:
            answer = fn()
            if not _ANSWERED.is_set():  # once: set() takes a lock, and this runs for every ranged read
                _ANSWERED.set()
            return answer
        except hf.GatedRepoError:
            raise GatedRepoError(
                f"{where} is gated: access must be granted before it can be read",
                repo_id=repo_id,
                revision=revision,
                hint="request access on its page; once granted, use a token of that account (HF_TOKEN or "
                "`hf auth login`)",
            ) from None
        except hf.RepositoryNotFoundError:
            raise RepoNotFoundError(
                f"repository {repo_id} not found, or it is private and the token sent (if any) cannot "
                "read it",
                repo_id=repo_id,
                revision=revision,
                hint="check the id; for a private repository set HF_TOKEN or run `hf auth login`",
            ) from None
        except hf.RevisionNotFoundError:
            raise RevisionNotFoundError(
                f"revision {revision!r} not found in {repo_id}",
                repo_id=repo_id,
                revision=revision,
                hint="check the branch, tag or commit id in the recipe",
            ) from None
        except hf.RemoteEntryNotFoundError:
            raise EntryNotFoundError(
                f"{what}: not found in {where}",
                repo_id=repo_id,
                revision=revision,
                hint="check that the repository holds a safetensors checkpoint",
            ) from None
        except hf.OfflineModeIsEnabled:
            # A ConnectionError to huggingface_hub, but no retry brings the Hub back: the user asked for none.
            # (Sources read the local cache when offline, open_cached: this is a push, or a file not cached.)
            raise HubError(
                f"{what} on {where} needs the Hub, and HF_HUB_OFFLINE is set",
                repo_id=repo_id,
                revision=revision,
                hint="unset HF_HUB_OFFLINE to reach the Hub",
            ) from None
        except hf.LocalTokenNotFoundError:
            raise HubError(
                f"{what} on {where} needs a Hub token, and none is set",
                repo_id=repo_id,
                revision=revision,
                hint="set HF_TOKEN or run `hf auth login`",
            ) from None
        except (httpx2.TransportError, hf.HfHubHTTPError, OSError) as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status is not None and status < 500 and status != 429:
                raise _refused(exc, status, what, where, repo_id, revision) from None
            if cancelled is not None and cancelled.is_set():
                raise HubConnectionError(
                    f"reading {what} from {where} stopped: the source was closed",
                    repo_id=repo_id,
                    revision=revision,
                ) from None
            said = _said(exc)
            if status is None and not _ANSWERED.is_set() and _unresolved(exc):
                # The Hub's host name is unknown (no network, a mistyped HF_ENDPOINT), and no request has
                # reached it yet: retries would only print warnings for seconds before this same end. Once the
                # Hub has answered, a resolver's failure is a blip, retried as any lost connection.
                host = _host(exc)
                raise HubConnectionError(
                    f"cannot reach the Hub for {what} on {where} ({said}): the host name "
                    + (f"{host!r} " if host else "")
                    + "does not resolve",
                    repo_id=repo_id,
                    revision=revision,
                    hint="check the network and HF_ENDPOINT, then rerun with --resume to continue where it "
                    "stopped",
                ) from None
            tries = f"{attempts} attempt{'s' * (attempts != 1)}"
            if attempt + 1 == attempts:
                if status is not None:  # it answered: the Hub (or a proxy) is failing, not the network
                    raise HubConnectionError(
                        f"the Hub answered {status} to {what} on {where} ({said}); gave up after {tries}",
                        repo_id=repo_id,
                        revision=revision,
                        hint="the Hub is failing for now: try again later with --resume to continue",
                    ) from None
                raise HubConnectionError(
                    f"lost the connection to the Hub during {what} on {where} ({said}); "
                    f"gave up after {tries}",
                    repo_id=repo_id,
                    revision=revision,
                    hint="check the network, then rerun with --resume to continue where it stopped",
                ) from None
            delay = min(0.5 * 2**attempt, 8.0)
            log.warning("%s on %s failed (%s); retrying in %.1f s", what, where, said, delay)
            if cancelled is not None:
                cancelled.wait(delay)
            else:
                time.sleep(delay)
    raise AssertionError("unreachable")


# How resolvers word a host name they cannot resolve: one that does not exist (EAI_NONAME), or any at all
# without a server to ask (EAI_AGAIN, as on a machine off the network).
_UNRESOLVED = ("Name or service not known", "Temporary failure in name resolution", "nodename nor servname")
_ANSWERED = threading.Event()  # some Hub request of this process succeeded: the host name resolves


def _unresolved(exc: BaseException) -> bool:
    """Whether ``exc`` (an httpx or huggingface_hub error) comes from a host name that did not resolve."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, socket.gaierror) or any(text in str(cause) for text in _UNRESOLVED):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _host(exc: BaseException) -> str | None:
    """The host an httpx error's request went to, if it says."""
    try:
        return str(exc.request.url.host)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError where no request was set
        return None


def _not_local_either(exc: RepoNotFoundError | HubConnectionError, ref: ModelRef) -> HubError:
    """``exc`` for a model's first request, which nothing has been merged before: no ``--resume`` in the
    hint, and, for an id that could have been a local path, that no such path exists (``ckpt/tweets``), or
    that one does, which ``repo:`` does not read."""
    message, hint = exc.message, exc.hint
    if isinstance(exc, HubConnectionError):
        hint = (
            "check the network (and HF_ENDPOINT); HF_HUB_OFFLINE=1 reads models already in the local Hugging "
            "Face cache"
        )
    if ref.local is not None and ref.local.exists():
        kind = "folder" if ref.local.is_dir() else "file"
        message += f"; a local {kind} {ref.local} exists, which `repo:` does not read"
        hint = f"to merge it write `path: {ref.repo_id}` instead of `repo:`; {hint}"
    elif ref.local is not None:
        message += f"; there is no local folder {ref.local} either"
        hint = f"for a local model, check the path (relative paths start at the recipe's folder); {hint}"
    return type(exc)(message, repo_id=exc.repo_id, revision=exc.revision, hint=hint)


def unsigned(text: str) -> str:
    """``text`` with the query of every URL in it cut: a signed URL's signature is a credential."""
    return re.sub(r"((?:https?://|url: )[^\s?'\"]+)\?[^\s'\"),;]*", r"\1?...", text)


class _Unsigned(logging.Filter):
    """Cuts signed URLs out of huggingface_hub's log lines (its retries name each failed request's URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = unsigned(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_UNSIGNED = _Unsigned()


_REDACTED = threading.Event()  # redact_hub_logs has run: hub_call, on every ranged read, returns at once


def redact_hub_logs() -> None:
    """Put :class:`_Unsigned` on huggingface_hub's log handlers (once; its root logger prints by a handler of
    its own). A CI log is often public, and a signed upload URL is a credential until it expires."""
    if _REDACTED.is_set():
        return
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.get_logger()  # configures the library's handler, if nothing has yet
    for handler in logging.getLogger("huggingface_hub").handlers:
        if _UNSIGNED not in handler.filters:
            handler.addFilter(_UNSIGNED)
    _REDACTED.set()


def _said(exc: BaseException) -> str:
    """An exception on one line, without signed URLs or huggingface_hub's pointer to the HTTP docs."""
    text = " ".join(str(exc).split())
    text = re.sub(r";? ?For more information check: \S+", "", text)
    return f"{type(exc).__name__}: {unsigned(text)}"


def _refused(
    exc: Exception, status: int, what: str, where: str, repo_id: str, revision: str | None
) -> HubError:
    """A request the Hub refused (4xx), on one line: the status, the Hub's own words, what to do."""
    said = " ".join(str(getattr(exc, "server_message", None) or "").split())
    reason = getattr(getattr(exc, "response", None), "reason_phrase", "") or ""
    detail = f"HTTP {status}" + (f" {reason}" if reason else "") + (f": {said}" if said else "")
    if status == 401:
        return HubError(
            f"the Hub refused the token for {what} on {where} ({detail})",
            repo_id=repo_id,
            revision=revision,
            hint="the token from HF_TOKEN or `hf auth login` is invalid or expired: set a valid one",
        )
    if status == 403:
        return HubError(
            f"the token has no permission for {what} on {where} ({detail})",
            repo_id=repo_id,
            revision=revision,
            hint="use a token with access to this repository (write access to push), or push to a "
            "namespace of your own",
        )
    return HubError(f"{what} from {where} failed ({detail})", repo_id=repo_id, revision=revision)


def cached_snapshot(repo_id: str, commit: str, files: Sequence[str], sizes: Mapping[str, int]) -> Path | None:
    """The local Hugging Face cache's snapshot folder of ``repo_id`` at ``commit``, if it holds every one of
    ``files`` whole (the size the Hub lists); else None.

    Models downloaded before (`hf download`, ``from_pretrained``) are then read from disk, not streamed again.
    """
    from huggingface_hub import try_to_load_from_cache

    folder: Path | None = None
    for name in files:
        found = try_to_load_from_cache(repo_id, name, revision=commit)
        if not isinstance(found, str):
            return None
        path = Path(found)
        try:
            if path.stat().st_size != sizes.get(name, -1):
                return None
        except OSError:
            return None
        here = path.parents[len(Path(name).parts) - 1]
        if folder is not None and here != folder:
            return None
        folder = here
    return folder


def offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE``, read when it is imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    """``revision``, or the one cached commit it abbreviates (``@3f2a9c1``, as the Hub's pages show commits).

    Online the Hub expands a short commit id; offline the cache knows commits by their full SHA only.
    """
    if revision is None or not re.fullmatch(r"[0-9a-f]{7,39}", revision):
        return revision
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cached = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    if (cached / "refs" / revision).is_file():  # a branch or tag that looks like a commit
        return revision
    snapshots = cached / "snapshots"
    try:
        found = [p.name for p in snapshots.iterdir() if p.name.startswith(revision) and len(p.name) == 40]
    except OSError:
        return revision
    return found[0] if len(found) == 1 else revision


def open_cached(ref: ModelRef, *, label: str) -> LocalSource:
    """A Hub model from its snapshot in the local Hugging Face cache, for offline mode.

    The snapshot is the one the cache maps ``ref.revision`` to (a branch or tag through ``refs/``), and its
    commit is what the card pins. Only the weights must be complete; other files are used where present.

    Raises:
        HubError: the cache has no snapshot for that revision, or one that lacks weight files.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    assert ref.repo_id is not None
    where = f"{ref.repo_id}@{ref.revision}" if ref.revision else ref.repo_id
    hint = (
        f"download it while online (`hf download {ref.repo_id}"
        + (f" --revision {ref.revision}" if ref.revision else "")
        + "`), unset HF_HUB_OFFLINE, or name a local copy with `path:` in the recipe"
    )

    def not_cached(message: str) -> HubError:
        return HubError(message, repo_id=ref.repo_id, revision=ref.revision, hint=hint)

    try:
        folder = Path(
            snapshot_download(
                ref.repo_id,
                revision=_cached_commit(ref.repo_id, ref.revision),
                local_files_only=True,
                allow_patterns=["*.safetensors", INDEX],
            )
        )
    except LocalEntryNotFoundError as exc:
        found = f"only part of {where} is" if "incomplete" in str(exc) else f"{where} is not"
        raise not_cached(
            f"{label}: {found} in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
        ) from None
    try:
        return LocalSource(ref, label=label, path=folder, commit=folder.name)
    except SourceError as exc:  # a snapshot with files missing that no cached listing told of
        raise not_cached(f"{exc.message} (the cached snapshot of {where}; HF_HUB_OFFLINE is set)") from None


class HubSource:
    """A model in a Hub repository, pinned to one commit."""

    def __init__(
        self, ref: ModelRef, *, label: str, transfer: Transfer = "ranges", token: str | None = None
    ) -> None:
        from huggingface_hub import HfApi

        assert ref.repo_id is not None  # open_source dispatches on this
        self.ref, self.label, self.transfer = ref, label, transfer
        self.repo_id = ref.repo_id
        self.api = HfApi(token=token)  # None: huggingface_hub's (HF_TOKEN, `hf auth login`)
        try:
            info = hub_call(
                lambda: self.api.model_info(self.repo_id, revision=ref.revision, files_metadata=True),
                repo_id=self.repo_id,
                revision=ref.revision,
                what="repository info",
            )
        except (RepoNotFoundError, HubConnectionError) as exc:
            raise _not_local_either(exc, ref) from None
        assert info.sha is not None
        self.commit: str | None = info.sha
        self._sha = info.sha
        self.private = bool(info.private)  # a public push's card would show this id (Publisher.begin)
        self._sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        self.tensors: dict[str, TensorInfo] = {}
        self._pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix=f"hubmerge-{label}")
        self._pending: dict[str, _Span] = {}  # tensor name -> the read that holds it
        self._spans: list[_Span] = []  # oldest first
        self._next: dict[str, TensorInfo] = {}  # tensor name -> the tensor stored right after it
        # A tensor over PREFETCH_LIMIT -> the rows of it read next, on their way (at most two tensors).
        self._ahead: dict[str, tuple[tuple[int, int], Future[Buffer]]] = {}
        self._scratch_dir: Path | None = None  # scratch: downloaded shards, spilled tensors
        self._kept: dict[str, int] = {}  # tensor name -> how many keep() calls hold it (see keep)
        self._spills: dict[str, _Spill | None] = {}  # kept tensors read in row ranges (None: no scratch file)
        self._spilled = 0  # spill files made: their names
        self._spill_writer: ThreadPoolExecutor | None = None
        self._shard: tuple[str, DirectReader] | None = None  # transfer="shards": the one downloaded
        self._direct: ranged.RangeClient | None = None
        self._closing = threading.Event()  # set by close(): reads under way stop instead of retrying
        if ranged.enabled():
            from huggingface_hub import constants
            from huggingface_hub.utils._headers import build_hf_headers

            headers = build_hf_headers(token=self.api.token)
            self._direct = ranged.RangeClient(headers, constants.HF_HUB_DOWNLOAD_TIMEOUT)
        shards = self._shards()
        self.cached = False
        # Every weight file in the local cache at this commit (downloaded before): tensors are read there,
        # other files (config, tokenizer) still come from the Hub as they are asked for.
        self._local: LocalSource | None = None
        snapshot = cached_snapshot(self.repo_id, self._sha, shards, self._sizes)
        if snapshot is not None:
            self._local = LocalSource(ref, label=label, path=snapshot, commit=self._sha)
            self.tensors = self._local.tensors
            self.cached = True
            log.info("%s: %s@%s is in the local Hugging Face cache; reading it there", label, ref, self._sha)
            return
        # One request per shard (two if its header is over HEADER_READ), all shards at once: on a remote Hub
        # each request is a round trip or two (a redirect), and a large model has dozens of shards.
        for shard, raw in zip(shards, self._pool.map(self._header_bytes, shards), strict=True):
            self._read_header(shard, raw)
        stored = sorted(self.tensors.values(), key=lambda i: (i.file, i.start))
        for a, b in zip(stored, stored[1:], strict=False):
            if a.file == b.file and a.end == b.start:
                self._next[a.name] = b

    def _shards(self) -> list[str]:
        if INDEX in self._sizes and SINGLE in self._sizes:
            log.warning(
                "%s: %s holds both %s and %s; reading %s, as transformers does",
                self.label,
                self.repo_id,
                SINGLE,
                INDEX,
                SINGLE,
            )
        if INDEX in self._sizes and SINGLE not in self._sizes:
            path = self.fetch(INDEX)
            assert path is not None
            self._weight_map: dict[str, str] | None = parse_index(
                path.read_bytes(), file=f"{self.repo_id}/{INDEX}"
            )
            shards = sorted(set(self._weight_map.values()))
            missing = [s for s in shards if s not in self._sizes]
            if missing:
                raise EntryNotFoundError(
                    f"{self.label}: {INDEX} of {self.repo_id}@{self._sha} lists '{missing[0]}', which the "
                    "repository lacks",
                    repo_id=self.repo_id,
                    revision=self._sha,
                    hint="the repository is incomplete",
                )
            return shards
        self._weight_map = None
        if SINGLE in self._sizes:
            return [SINGLE]
        candidates = sorted(f for f in self._sizes if f.endswith(".safetensors") and "/" not in f)
        if len(candidates) == 1 and is_whole(candidates[0]):
            return candidates
        if candidates:  # shards without their index (a lone shard too: it is only a part of the model)
            raise SourceError(
                f"{self.label}: {self.repo_id}@{self._sha} holds {len(candidates)} .safetensors "
                f"file{'s' * (len(candidates) != 1)} "
                f"({', '.join(candidates[:4])}) but no {INDEX}",
                location=self.repo_id,
                hint=f"the repository lacks {INDEX}: ask its owner to add it, or merge a local copy with one",
            )
        pickles = sorted(f for f in self._sizes if f.endswith(PICKLE_SUFFIXES))
        hint = "hubmerge reads safetensors only; convert with save_pretrained(safe_serialization=True)"
        found = f"only pickle files ({', '.join(pickles[:3])})" if pickles else "no safetensors checkpoint"
        raise SourceError(
            f"{self.label}: {self.repo_id}@{self._sha} has {found}", location=self.repo_id, hint=hint
        )

    def _header_bytes(self, shard: str) -> bytes:
        """The 8-byte length and the JSON header of ``shard``."""
        where = f"{self.repo_id}@{self._sha[:12]}/{shard}"
        size = self._sizes.get(shard) or 0
        first = bytes(self._range(shard, 0, min(size, HEADER_READ) if size else 8))
        n = header_length(first[:8], file=where, file_size=size or 8 + int.from_bytes(first[:8], "little"))
        if 8 + n > len(first):
            first += bytes(self._range(shard, len(first), 8 + n))
        return first[: 8 + n]

    def _read_header(self, shard: str, raw: bytes) -> None:
        where = f"{self.repo_id}@{self._sha[:12]}/{shard}"
        size = self._sizes.get(shard) or 0
        header = parse_header(raw[8:], file=where, file_size=size or None)  # None: the listing gave no size
        for name, info in header.tensors.items():
            if self._weight_map is not None and self._weight_map.get(name) != shard:
                continue
            if name in self.tensors:
                raise HeaderError(
                    f"{self.label}: tensor '{name}' appears in two shards of {self.repo_id}",
                    location=self.repo_id,
                )
            self.tensors[name] = TensorInfo(name, info.dtype, info.shape, shard, info.start, info.end)

    def _range(self, filename: str, start: int, end: int, into: Buffer | None = None) -> Buffer:
        """Bytes ``[start, end)`` of a file at the pinned commit, in ``into`` (see :func:`buffer`) if given.

        Prefetches pass a buffer allocated on the merge loop's thread: while merging, malloc keeps freed
        memory for reuse (buffers.py), and buffers allocated on each download thread would each stay in that
        thread's own arena (several hundred MB in all); on one thread they are reused.
        """
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils._headers import build_hf_headers
        from huggingface_hub.utils._http import get_session, hf_raise_for_status

        url = hf_hub_url(self.repo_id, filename, revision=self._sha)
        headers = build_hf_headers(token=self.api.token) | {"Range": f"bytes={start}-{end - 1}"}

        def get() -> Buffer:
            buf: Buffer = into if into is not None else bytearray(end - start)
            view = writable(buf)
            assert len(view) == end - start
            if self._direct is not None:
                try:
                    self._direct.read_into(url, start, view)
                    return buf
                except Fallback as why:
                    if self._closing.is_set():  # the source closed while the request was on its way
                        raise ConnectionError("the Hub source is closed") from None
                    log.debug(
                        "%s: %s bytes %d-%d through huggingface_hub: %s",
                        self.label,
                        filename,
                        start,
                        end - 1,
                        why,
                    )
            with get_session().stream("GET", url, headers=headers, follow_redirects=True) as response:
                hf_raise_for_status(response)
                skip = start if response.status_code == 200 else 0  # a server that ignores Range
                pos = 0
                # Raw chunks as they arrive, copied once into the buffer, unless the body is compressed.
                encoded = response.headers.get("content-encoding", "identity") not in ("", "identity")
                for chunk in response.iter_bytes(CHUNK) if encoded else response.iter_raw():
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    take = chunk[: len(view) - pos]
                    view[pos : pos + len(take)] = take
                    pos += len(take)
                    if pos == len(view):
                        break
            if pos != len(view):
                raise OSError(f"short read: got {pos} of {len(view)} bytes")
            return buf

        return hub_call(
            get,
            repo_id=self.repo_id,
            revision=self._sha,
            what=f"{filename} bytes {start}-{end - 1}",
            cancelled=self._closing,
        )

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        from .tensors import view_bytes

        if self._local is not None:
            return self._local.read(info, rows)
        span = self._pending.get(info.name)  # never set with transfer="shards" (prefetch does nothing)
        kept = info.name in self._kept
        if span is not None:
            # The run loop reads a tensor in row ranges, in order: the prefetched bytes serve them all, and
            # the tensor is done with at its last one (or, kept, when the run drops it).
            if not kept and (rows is None or rows[1] >= (info.shape[0] if info.shape else 1)):
                self._done_with(info.name)
            at = info.start - span.start
            local = TensorInfo(info.name, info.dtype, info.shape, info.file, at, at + info.nbytes)
            return view_bytes(span.future.result(), local, rows)
        count = info.shape[0] if info.shape else 1
        want = rows or (0, count)
        start, end = _row_span(info, want)
        spill = self._spills.get(info.name) if kept else None
        mapped = spill.mapped() if spill is not None else None
        if mapped is not None:  # a later pass over a kept tensor: its bytes are on disk
            on_disk = TensorInfo(info.name, info.dtype, info.shape, info.file, 0, info.nbytes)
            return view_bytes(mapped, on_disk, rows)
        held = self._ahead.pop(info.name, None)
        if self.transfer == "shards":
            data = self._shard_bytes(info.file, start, end)
        elif held is not None and held[0] == want:
            data = held[1].result()
        else:
            if held is not None:
                held[1].cancel()
            data = self._range(info.file, start, end, buffer(end - start))
        if kept and self.transfer != "shards":
            if info.name not in self._spills:
                self._spills[info.name] = spill = self._new_spill(info)
            if spill is not None:
                if self._spill_writer is None:
                    self._spill_writer = ThreadPoolExecutor(
                        1, thread_name_prefix=f"hubmerge-{self.label}-spill"
                    )
                spill.add(self._spill_writer, start - info.start, data)
        if rows is not None and rows[1] < count and self.transfer != "shards":
            # The run reads a large tensor's row ranges in order: the next downloads while this one merges.
            self._read_ahead(info, (rows[1], min(count, 2 * rows[1] - rows[0])))
        shape = (want[1] - want[0], *info.shape[1:]) if rows is not None else info.shape
        return view_bytes(data, TensorInfo(info.name, info.dtype, shape, info.file, 0, end - start), None)

    def _shard_bytes(self, shard: str, start: int, end: int) -> Buffer:
        """Bytes ``[start, end)`` of ``shard``, downloaded first if it is not the one on disk.

        They are read around the page cache (a thread reading ahead) into a buffer of the kind the ranged
        reads use: mapping the downloaded file would fault in every page of it, new to the page cache, on
        the merge's cores.
        """
        reader = self._shard_reader(shard)
        data = buffer(end - start)
        reader.seek(start)
        if reader.readinto(writable(data)) != end - start:
            raise OSError(f"{self.label}: {shard} is shorter than its header says")
        return data

    def _read_ahead(self, info: TensorInfo, rows: tuple[int, int]) -> None:
        """Start reading rows ``[a, b)`` of ``info`` in the background; :meth:`read` takes them when asked."""
        start, end = _row_span(info, rows)
        into = buffer(end - start)  # allocated on the loop's thread, as prefetches are (see _range)
        self._ahead[info.name] = (rows, self._pool.submit(self._range, info.file, start, end, into))
        while len(self._ahead) > AHEAD_TENSORS:  # a tensor never read must not hold its bytes for ever
            self._ahead.pop(next(iter(self._ahead)))[1].cancel()

    def prefetch(self, infos: Sequence[TensorInfo], rows: tuple[int, int] | None = None) -> None:
        """Start reading ``infos`` (and the small tensors stored right after them) in the background.

        One request takes a tensor and the ones that follow it in the file, up to ``SPAN_BYTES``: most
        tensors of a checkpoint (norms, biases, small projections) then cost no request of their own.
        Of a tensor over ``PREFETCH_LIMIT``, only ``rows`` are read, the part the run asks for first.
        """
        if self._local is not None:
            self._local.prefetch(infos, rows)
            return
        if self.transfer == "shards":
            return
        for info in infos:
            if info.nbytes > PREFETCH_LIMIT:
                if rows is None or info.name in self._ahead or info.name in self._pending:
                    continue
                # A hint finds room or waits for the loop: evicting would cancel a read the loop wants sooner.
                if len(self._ahead) < AHEAD_TENSORS:
                    self._read_ahead(info, (rows[0], min(rows[1], info.shape[0] if info.shape else 1)))
                continue
            held = self._pending.get(info.name)
            if held is not None:
                # Already on its way: keep one more read going behind the newest one.
                after = self._next.get(held.last) if held is self._spans[-1] else None
                if after is None or after.name in self._pending or after.nbytes > PREFETCH_LIMIT:
                    continue  # a large tensor comes in row ranges, when the run asks for it
                info = after
            # Bounded read-ahead: a few requests at a time, and only so many bytes on their way.
            flying = [s for s in self._spans if not s.future.done()]
            if flying and (len(flying) >= IN_FLIGHT or sum(s.end - s.start for s in flying) > AHEAD_BYTES):
                return
            names, last, after = {info.name}, info, self._next.get(info.name)
            while (
                after is not None and after.end - info.start <= SPAN_BYTES and after.name not in self._pending
            ):
                names.add(after.name)
                last, after = after, self._next.get(after.name)
            future = self._pool.submit(
                self._range, info.file, info.start, last.end, buffer(last.end - info.start)
            )
            span = _Span(future, info.start, last.end, last.name, names)
            self._spans.append(span)
            self._pending |= dict.fromkeys(names, span)
            # Tensors a run never asks for (resumed, or not merged) must not pin their reads for ever.
            while len(self._spans) > 4 * IN_FLIGHT:
                for name in list(self._spans[0].unread):
                    self._done_with(name)

    def release(self, infos: Sequence[TensorInfo]) -> None:
        """A model read from the local Hugging Face cache unmaps merged tensors' pages as a local one does."""
        if self._local is not None:
            self._local.release(infos)

    def keep(self, infos: Sequence[TensorInfo]) -> None:
        """The run reads ``infos`` more than once (statistics passes, then the merge): keep their bytes.

        Small tensors stay in the read that holds them; larger ones read in row ranges are written to a
        scratch file as they arrive (:class:`_Spill`). Either way each byte is downloaded once, until
        :meth:`drop`. Calls nest (a model that is also the base).
        """
        if self._local is not None or self.transfer == "shards":
            return  # read from files on disk anyway
        for info in infos:
            self._kept[info.name] = self._kept.get(info.name, 0) + 1

    def drop(self, infos: Sequence[TensorInfo]) -> None:
        """The run is done with tensors it asked to :meth:`keep`: free their bytes."""
        for info in infos:
            held = self._kept.get(info.name)
            if held is None:
                continue
            if held > 1:
                self._kept[info.name] = held - 1
                continue
            del self._kept[info.name]
            self._done_with(info.name)
            spill = self._spills.pop(info.name, None)
            if spill is not None:
                spill.close()

    def _new_spill(self, info: TensorInfo) -> _Spill | None:
        self._spilled += 1
        try:
            return _Spill(self._scratch() / f"kept-{self._spilled}.tensor", info.nbytes)
        except OSError as exc:
            log.debug(
                "%s: no scratch file for %s (%s); its next passes read the Hub", self.label, info.name, exc
            )
            return None

    def _scratch(self) -> Path:
        if self._scratch_dir is None:
            self._scratch_dir = Path(tempfile.mkdtemp(prefix="hubmerge-"))
        return self._scratch_dir

    def _done_with(self, name: str) -> None:
        span = self._pending.pop(name, None)
        if span is None:
            return
        span.unread.discard(name)
        if not span.unread:
            self._spans.remove(span)

    def _shard_reader(self, shard: str) -> DirectReader:
        if self._shard is not None and self._shard[0] == shard:
            return self._shard[1]
        self._evict()
        path = self._scratch() / shard.replace("/", "_")
        size = self._sizes.get(shard) or 0
        # One reused buffer, and the file written around the page cache (directio.py): a download of
        # gigabytes into fresh buffers and fresh cache pages cost more CPU than the transfer itself.
        piece = bytearray(min(size, SHARD_PIECE))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with writing(fd, path) as out:
                for start in range(0, size, SHARD_PIECE):
                    end = min(size, start + SHARD_PIECE)
                    into = piece if end - start == len(piece) else bytearray(end - start)  # the last piece
                    out.write(writable(self._range(shard, start, end, into)), start)
        except OSError as exc:
            if isinstance(exc, HubmergeError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise SourceError(
                f"{self.label}: no room for {shard} ({size} bytes) in the temporary folder "
                f"{path.parent.parent} ({exc.strerror})",
                location=str(path),
                hint="point TMPDIR at a disk with room for one shard per model, or read by ranges "
                "(--hub-transfer ranges, the default), which downloads no shard",
            ) from None
        finally:
            os.close(fd)
        self._shard = (shard, DirectReader(path))
        log.debug("%s: downloaded %s (%d bytes)", self.label, shard, size)
        return self._shard[1]

    def _evict(self) -> None:
        if self._shard is None:
            return
        name, reader = self._shard
        reader.close()
        assert self._scratch_dir is not None
        (self._scratch_dir / name.replace("/", "_")).unlink(missing_ok=True)
        self._shard = None

    def files(self) -> list[str]:
        return sorted(self._sizes)

    def fetch(self, filename: str) -> Path | None:
        from huggingface_hub import hf_hub_download

        if filename not in self._sizes:
            return None
        path = hub_call(
            lambda: hf_hub_download(self.repo_id, filename, revision=self._sha, token=self.api.token),
            repo_id=self.repo_id,
            revision=self._sha,
            what=filename,
        )
        return Path(path)

    def close(self) -> None:
        # Reads still under way (a merge stopped by an error, Ctrl-C or SIGTERM) fail at once instead of
        # finishing, or waiting out a stalled connection's timeout and retries, before the scratch goes.
        self._closing.set()
        if self._local is not None:
            self._local.close()
        for span in self._spans:
            span.future.cancel()
        for _, future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        self._pending.clear()
        self._spans.clear()
        if self._direct is not None:
            self._direct.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._kept.clear()
        for spill in self._spills.values():
            if spill is not None:
                spill.close()
        self._spills.clear()
        if self._spill_writer is not None:
            self._spill_writer.shutdown(wait=True)
        self._evict()
        if self._scratch_dir is not None:
            shutil.rmtree(self._scratch_dir, ignore_errors=True)


def _row_span(info: TensorInfo, rows: tuple[int, int]) -> tuple[int, int]:
    """The file offsets of rows ``[a, b)`` of ``info``."""
    step = info.row_bytes
    return info.start + rows[0] * step, info.start + rows[1] * step
