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
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)

ALIGN = 4096  # covers the logical block size of every common device (512 or 4096)
STAGE = 8 << 20  # bytes per direct write (1.6 GB here: 1 MiB writes 0.85 s, 8 MiB 0.75 s, 32 MiB 0.70 s)
DEPTH = 4  # staging buffers in all: one filling, the rest on their way to the device
MAX_PWRITE = 1 << 30  # Linux writes at most ~2 GiB per call; stay well below


def enabled() -> bool:
    """Whether output may be written with ``O_DIRECT`` (``HUBMERGE_DIRECT_WRITE=0`` turns it off)."""
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

    Not thread-safe: one thread (the run loop's writer) calls it.

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
        while self._flying and self._flying[0][1].done():
            _, future, buf = self._flying.popleft()
            self.io.spare.append(buf)
            future.result()  # an error of the write surfaces here
        if self._flying:
            return self._flying[0][0]
        return self._base if self._base >= 0 and self._fill else -1

    def flush(self) -> None:
        """Put every byte handed to :meth:`write` into the file: whole blocks directly, the rest buffered."""
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
