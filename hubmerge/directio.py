"""Output bytes written around the page cache (``O_DIRECT``), for the shard writer and the Hub server.

A merge writes gigabytes it will not read again. Through the page cache every byte is first copied into a
cache page, on the merge's own cores, and each page is memory to find and touch for the first time: on a
virtual machine whose host takes back freed memory, a buffered write of 1.6 GB took 0.3 s of system time
into pages just freed and 3-4 s into pages the host had reclaimed, and on any machine the output evicts
the input checkpoints the merge is reading. With ``O_DIRECT`` the device copies straight from our buffers
(1.6 GB in 0.8 s here, 0.02 s of it CPU) on a thread of its own, while the merge goes on.

``O_DIRECT`` wants offsets, lengths and the buffer address aligned to the device's blocks, and a tensor's
bytes start anywhere in a shard. :class:`DirectFile` copies consecutive writes (a *run*) into aligned
staging buffers and hands each full one to the I/O thread, up to ``DEPTH`` at a time; the bytes before the
first block boundary of a run, and those after its last one when it is flushed, go through the page cache.
Linux keeps the two kinds of write coherent, and no block written directly is ever in the cache. A file
system that refuses ``O_DIRECT`` (tmpfs on older kernels) gets buffered writes only, and so does every
file when ``HUBMERGE_DIRECT_WRITE=0``.

:class:`DirectReader` reads such a file back once, for a push's upload, the same way around the cache.
"""

from __future__ import annotations

import errno
import io
import logging
import mmap
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

log = logging.getLogger(__name__)

ALIGN = 4096  # covers the logical block size of every common device (512 or 4096)
STAGE = 8 << 20  # bytes per direct write (1.6 GB here: 1 MiB writes 0.85 s, 8 MiB 0.75 s, 32 MiB 0.70 s)
DEPTH = 4  # staging buffers in all: one filling, the rest on their way to the device
MAX_PWRITE = 1 << 30  # Linux writes at most ~2 GiB per call; stay well below


def enabled() -> bool:
    """Whether output may be written and read back with ``O_DIRECT`` (``HUBMERGE_DIRECT_WRITE=0``: no)."""
    return os.environ.get("HUBMERGE_DIRECT_WRITE", "1") != "0" and hasattr(os, "O_DIRECT")


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    data = data.cast("B")
    while len(data):
        written = os.pwrite(fd, data[:MAX_PWRITE], offset)
        data, offset = data[written:], offset + written


class DirectIO:
    """What the direct writes of several files share: the I/O thread and the staging buffers.

    A merge writes its shards one after another; sharing keeps their staging memory at ``DEPTH`` buffers.
    """

    def __init__(self) -> None:
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="hubmerge-direct")
        self.spare: list[mmap.mmap] = []  # page-aligned staging buffers not in use
        self.made = 0

    def take(self) -> mmap.mmap | None:
        """A staging buffer, or None when ``DEPTH`` are in use (the caller waits for one of its own)."""
        if self.spare:
            return self.spare.pop()
        if self.made < DEPTH:
            self.made += 1
            return mmap.mmap(-1, STAGE)
        return None

    def close(self) -> None:
        """Stop the thread (after the writes given to it) and unmap the buffers."""
        self.thread.shutdown(wait=True)
        for buf in self.spare:
            try:
                buf.close()
            except BufferError:
                pass  # a failed write's traceback still views it; it is freed with that
        self.spare.clear()


class DirectFile:
    """Writes to one open file, runs of consecutive writes through ``O_DIRECT`` where the file system allows.

    Not thread-safe: one thread (the run loop's writer) calls it. A failed write fails every later call
    (``write``, ``written_to``, ``flush``, ``close``): no byte handed over after it counts as written, so a
    journal trusting :meth:`written_to` never lists a tensor whose bytes are not all in the file.

    Args:
        fd: the file, open for writing; it stays the caller's to close.
        path: the same file, opened once more with ``O_DIRECT`` for the aligned part of each run.
        io: the thread and buffers it shares with the other files of the output; None: buffered writes only.
    """

    def __init__(self, fd: int, path: str | os.PathLike[str], io: DirectIO | None) -> None:
        self.fd, self._shared = fd, io
        self._direct_fd = -1
        if io is not None and enabled():
            try:
                self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError as exc:  # the file system has no direct I/O
                log.debug("%s: writing through the page cache (%s)", path, exc)
        self._direct = self._direct_fd >= 0  # cleared if the device refuses a write
        self._stage: mmap.mmap | None = None  # the one filling
        self._flying: deque[tuple[int, Future[None], mmap.mmap]] = deque()  # (file offset, write, buffer)
        self._base = -1  # the block-aligned file offset of the staged bytes; -1: no run open
        self._fill = 0
        self._error: Exception | None = None  # the first failed write

    @property
    def io(self) -> DirectIO:
        assert self._shared is not None  # a run is open only where direct writes were set up
        return self._shared

    @property
    def direct(self) -> bool:
        """Whether direct writes are (still) in use."""
        return self._direct

    def write(self, data: memoryview, offset: int) -> None:
        """Write ``data`` at ``offset``; its bytes may still be staged or on their way when this returns."""
        with self._failing():
            self._write(data, offset)

    def _write(self, data: memoryview, offset: int) -> None:
        data = data.cast("B")
        if not self._direct and self._base < 0:
            pwrite_all(self.fd, data, offset)
            return
        if self._base < 0 or offset != self._base + self._fill:
            self.flush()
            head = min(len(data), -offset % ALIGN)  # up to the first block boundary: through the cache
            pwrite_all(self.fd, data[:head], offset)
            data, offset = data[head:], offset + head
            if not len(data) or not self._direct:
                pwrite_all(self.fd, data, offset)
                return
            self._base, self._fill = offset, 0
        while len(data):
            stage = self._stage if self._stage is not None else self._take_buffer()
            self._stage = stage
            n = min(len(data), STAGE - self._fill)
            stage[self._fill : self._fill + n] = data[:n]
            self._fill += n
            data = data[n:]
            if self._fill == STAGE:
                self._send(STAGE)
                self._base += STAGE
                self._fill = 0

    def written_to(self) -> int:
        """A file offset below which every byte handed to :meth:`write` is in the file (-1: all of them)."""
        with self._failing():
            while self._flying and self._flying[0][1].done():
                _, future, buf = self._flying.popleft()
                self.io.spare.append(buf)
                future.result()  # an error of the write surfaces here
        if self._flying:
            return self._flying[0][0]
        return self._base if self._base >= 0 and self._fill else -1

    def flush(self) -> None:
        """Put every byte handed to :meth:`write` into the file: whole blocks directly, the rest buffered."""
        with self._failing():
            self._flush()

    @contextmanager
    def _failing(self) -> Iterator[None]:
        """Raise the first failed write again; remember one that fails inside."""
        if self._error is not None:
            raise self._error
        try:
            yield
        except Exception as exc:
            self._error = exc
            raise

    def _flush(self) -> None:
        if self._base >= 0:
            whole = self._fill - self._fill % ALIGN
            if self._fill > whole:
                assert self._stage is not None
                with memoryview(self._stage) as stage:
                    pwrite_all(self.fd, stage[whole : self._fill], self._base + whole)
            if whole:
                self._send(whole)
            self._base, self._fill = -1, 0
        while self._flying:
            _, future, buf = self._flying.popleft()
            self.io.spare.append(buf)
            future.result()
        if self._stage is not None:
            self.io.spare.append(self._stage)
            self._stage = None

    def close(self) -> None:
        """Flush and close the direct descriptor (not ``fd``); the buffers go back to ``io``."""
        try:
            self.flush()
        finally:
            while self._flying:  # a write failed: wait for the others before anything is closed
                _, future, buf = self._flying.popleft()
                self.io.spare.append(buf)
                future.exception()
            if self._direct_fd >= 0:
                os.close(self._direct_fd)
                self._direct_fd = -1
            self._direct = False

    def _take_buffer(self) -> mmap.mmap:
        buf = self.io.take()
        if buf is None and self._flying:  # all are on their way: wait for the oldest
            _, future, buf = self._flying.popleft()
            future.result()
        return buf if buf is not None else mmap.mmap(-1, STAGE)  # other files hold them all

    def _send(self, length: int) -> None:
        """Hand the first ``length`` staged bytes (whole blocks) to the I/O thread; a new buffer stages."""
        assert self._stage is not None
        future = self.io.thread.submit(self._pwrite, self._stage, length, self._base)
        self._flying.append((self._base, future, self._stage))
        self._stage = None

    def _pwrite(self, buf: mmap.mmap, length: int, offset: int) -> None:
        with memoryview(buf) as view:
            if self._direct:
                try:
                    pwrite_all(self._direct_fd, view[:length], offset)
                    return
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    # The device wants a larger alignment than ALIGN: from here on, through the cache.
                    log.debug("direct write refused (%s); writing through the page cache", exc)
                    self._direct = False
            pwrite_all(self.fd, view[:length], offset)


@contextmanager
def writing(fd: int, path: str | os.PathLike[str]) -> Iterator[DirectFile]:
    """A :class:`DirectFile` with a thread and buffers of its own, for one file written on its own (a
    download, an upload); everything handed to it is in the file when the block ends, even on an error.

    Args:
        fd: the file, open for writing; it stays the caller's to close.
        path: the same file (for its ``O_DIRECT`` descriptor).
    """
    shared = DirectIO()
    file = DirectFile(fd, path, shared)
    try:
        yield file
    finally:
        try:
            file.close()
        finally:
            shared.close()


class Aborted(Exception):
    """A read of a :class:`DirectReader` after :meth:`DirectReader.abort`.

    Not an OSError: HTTP clients retry those; an aborted upload must end.
    """


class DirectReader(io.BufferedIOBase):
    """A file read around the page cache, front to back, with a thread reading ahead.

    For a shard that was just written with :class:`DirectFile` and is read once, to upload it: through the
    cache every byte would land in a fresh cache page (the cost ``DirectFile`` avoids on the way in), and
    read directly but one block at a time the reader would wait on the device between blocks. Here a
    thread keeps ``depth - 1`` blocks of ``block`` bytes on their way past the one being read.
    Seeking anywhere works (an upload retried from its start, a multipart upload's parts); a seek off the
    path read ahead starts the read-ahead again there. A file system without direct I/O is read through the
    cache, with the same read-ahead.

    Args:
        path: the file.
        depth: buffers of ``block`` bytes in all (at least 2).
        block: bytes per read (a multiple of ``ALIGN``).
        on_read: called with the number of bytes each read gave (a progress bar).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        depth: int = DEPTH,
        block: int = STAGE,
        on_read: Callable[[int], object] | None = None,
    ) -> None:
        super().__init__()
        self.name = os.fspath(path)
        self._on_read = on_read
        self._depth, self._block = depth, block
        self._fd = -1
        if enabled():
            try:
                self._fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as exc:
                log.debug("%s: reading through the page cache (%s)", path, exc)
        self.direct = self._fd >= 0
        if self._fd < 0:
            self._fd = os.open(path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size
        self._pos = 0
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="hubmerge-readahead")
        self._ahead: deque[tuple[int, Future[int], mmap.mmap]] = deque()  # (block index, read, buffer)
        self._spare: list[mmap.mmap] = []
        self._current: tuple[int, int, mmap.mmap] | None = None  # (block index, bytes in it, buffer)
        self._aborted = False

    def abort(self) -> None:
        """Make every later read fail, from any thread: the upload reading this file stops at its next read.

        (``close`` is for the thread that reads; this only sets a flag.)
        """
        self._aborted = True

    def _check(self) -> None:
        if self.closed:
            raise ValueError("read of a closed file")
        if self._aborted:
            raise Aborted(f"read of {self.name} aborted: the run was stopped")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if self.closed:
            raise ValueError("seek of a closed file")
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, f"negative seek position {base + offset}")
        self._pos = base + offset  # the read-ahead follows at the next read
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        self._check()
        size = max(0, self._size - self._pos) if size is None or size < 0 else size
        index, at = divmod(self._pos, self._block)
        if 0 < size and self._pos < self._size:
            filled, buf = self._load(index)
            if at + size <= filled:  # the usual case (an HTTP client's 64 KiB reads): one copy
                self._pos += size
                if self._on_read is not None:
                    self._on_read(size)
                return buf[at : at + size]
        out = bytearray(min(size, max(0, self._size - self._pos)))
        n = self.readinto(out)
        return bytes(out) if n == len(out) else bytes(out[:n])

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        self._check()
        with memoryview(buffer) as target:
            target = target.cast("B")
            done = 0
            while done < len(target) and self._pos < self._size:
                index, at = divmod(self._pos, self._block)
                filled, buf = self._load(index)
                n = min(len(target) - done, filled - at)
                if n <= 0:  # the file shrank under us: stop at what is there
                    break
                target[done : done + n] = buf[at : at + n]
                done += n
                self._pos += n
            if self._on_read is not None and done:
                self._on_read(done)
            return done

    def _load(self, index: int) -> tuple[int, mmap.mmap]:
        """The block ``index``, read (waiting for it if needed), with read-ahead past it started."""
        if self._current is not None and self._current[0] == index:
            return self._current[1], self._current[2]
        if self._current is not None:
            self._spare.append(self._current[2])
            self._current = None
        while self._ahead and self._ahead[0][0] != index:  # behind us, or a seek left them off the path
            _, future, buf = self._ahead.popleft()
            if not future.cancel():
                future.exception()  # wait for the read to finish with its buffer; nobody wants its bytes
            self._spare.append(buf)
        if not self._ahead:
            self._submit(index)
        _, future, buf = self._ahead.popleft()
        self._top_up()
        filled = future.result()
        self._current = (index, filled, buf)
        return filled, buf

    def _submit(self, index: int) -> None:
        buf = self._spare.pop() if self._spare else mmap.mmap(-1, self._block)
        self._ahead.append((index, self._thread.submit(self._pread, buf, index * self._block), buf))

    def _top_up(self) -> None:
        """Keep ``depth - 1`` blocks on their way past the current one (``depth`` buffers in all)."""
        last = (self._size - 1) // self._block
        nxt = self._ahead[-1][0] + 1 if self._ahead else (self._pos // self._block) + 1
        while len(self._ahead) < self._depth - 1 and nxt <= last:
            self._submit(nxt)
            nxt += 1

    def _pread(self, buf: mmap.mmap, offset: int) -> int:
        with memoryview(buf) as view:
            filled = 0
            while filled < len(view):
                try:
                    n = os.preadv(self._fd, [view[filled:]], offset + filled)
                except OSError as exc:
                    if exc.errno != errno.EINVAL or not self.direct:
                        raise
                    log.debug("direct read refused (%s); reading through the page cache", exc)
                    self._reopen_buffered()
                    continue
                if n == 0:
                    break
                filled += n
            return filled

    def _reopen_buffered(self) -> None:
        fd = os.open(self.name, os.O_RDONLY)
        os.dup2(fd, self._fd)
        os.close(fd)
        self.direct = False

    def close(self) -> None:
        if self.closed:
            return
        try:
            for _, future, _ in self._ahead:
                future.cancel()
            self._thread.shutdown(wait=True)
            for buf in (
                [b for _, _, b in self._ahead] + self._spare + ([self._current[2]] if self._current else [])
            ):
                buf.close()
            self._ahead.clear()
            self._spare.clear()
            self._current = None
            os.close(self._fd)
        finally:
            super().close()
