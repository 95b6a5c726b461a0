"""Read buffers for Hub bytes: malloc'd memory, not zeroed, that needs no torch and is reused by malloc.

``bytearray(n)`` zeroes its memory before the download overwrites it, and memory fresh from the kernel is
zeroed once more as each page is first touched: for gigabytes of reads that was a tenth of the merge's CPU
time. A buffer here is ``n`` bytes from the C library's ``malloc`` (on the thread that asks: the merge
loop's), written once, by the read; tensors view it without a copy (``torch.frombuffer`` keeps it alive)
and it is freed when the last view goes. Needing no torch lets the first reads start before torch is
imported (run.py's ``start_reads``). While merging, malloc keeps freed memory
(:func:`retain_freed_memory`), so later reads reuse pages already touched instead of faulting in new ones.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import TypeAlias

    import torch

    Buffer: TypeAlias = bytearray | ctypes.Array[ctypes.c_ubyte] | torch.Tensor

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None)  # the process's own C library (POSIX)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.restype = None
        libc.free.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError, TypeError):
        return None
    return libc


_LIBC = _libc()

# Whether this process is hubmerge's own (the command sets it, cli.run): then a merge may tune process-wide
# settings for its duration, glibc's malloc thresholds (retain_freed_memory) and the garbage collector
# (run.execute). A program that calls merge() keeps its own: they would hold for its other threads too.
OWN_PROCESS = False


def buffer(size: int) -> Buffer:
    """``size`` bytes of uninitialised memory (zeroed, as a bytearray, where there is no C library to ask)."""
    if _LIBC is None or size == 0:
        return bytearray(size)
    address = _LIBC.malloc(size)
    if not address:
        raise MemoryError(f"cannot allocate a read buffer of {size} bytes")
    block = (ctypes.c_ubyte * size).from_address(address)
    weakref.finalize(block, _LIBC.free, address).atexit = False  # the OS takes it back at exit
    return block


def writable(buf: Buffer) -> memoryview:
    """A writable byte view of ``buf``; it is valid while ``buf`` is alive, so the caller keeps ``buf``."""
    if isinstance(buf, (bytearray, ctypes.Array)):
        return memoryview(buf).cast("B")
    assert buf.dtype.itemsize == 1 and buf.is_contiguous() and buf.device.type == "cpu"
    if buf.numel() == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * buf.numel()).from_address(buf.data_ptr())).cast("B")


def retain_freed_memory(retain: bool) -> None:
    """Tell glibc's malloc to keep freed memory (``retain``), or go back to its defaults and trim.

    Every block allocates and frees a few MiB of temporaries, and every read a buffer of up to ``READ_BYTES``.
    With the default thresholds malloc hands that memory back to the kernel after each use and the next use
    faults it in again, page by page, zeroed: that churn alone cost as much system time as the whole merge.
    Other C libraries are left alone. Only in a process of hubmerge's own (:data:`OWN_PROCESS`): the
    thresholds hold for the whole process, and once set malloc no longer adapts them, so a program that
    calls ``merge()`` keeps its allocator as it was.
    """
    mallopt, trim = (getattr(_LIBC, name, None) for name in ("mallopt", "malloc_trim"))
    if mallopt is None or trim is None or not OWN_PROCESS:
        return
    if retain:
        mallopt(_M_MMAP_THRESHOLD, 256 << 20)
        mallopt(_M_TRIM_THRESHOLD, 512 << 20)
    else:
        mallopt(_M_MMAP_THRESHOLD, 128 << 10)
        mallopt(_M_TRIM_THRESHOLD, 128 << 10)
        trim(0)
