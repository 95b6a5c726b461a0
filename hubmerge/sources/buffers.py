"""Read buffers for Hub bytes: memory from torch's allocator, not zeroed, filled through a memoryview.

``bytearray(n)`` zeroes its memory before the download overwrites it, and memory fresh from the kernel is
zeroed once more as each page is first touched: for gigabytes of reads that was a tenth of the merge's CPU
time. A uint8 tensor from ``torch.empty`` comes from malloc's reused memory (run.py keeps freed memory) and
is written once, by the read; tensors then view it without a copy.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from .._torch import torch

if TYPE_CHECKING:
    from typing import TypeAlias

    Buffer: TypeAlias = bytearray | torch.Tensor


def buffer(size: int) -> torch.Tensor:
    """``size`` bytes of uninitialised memory, as a uint8 tensor."""
    return torch.empty(size, dtype=torch.uint8)


def writable(buf: Buffer) -> memoryview:
    """A writable byte view of ``buf``; it is valid while ``buf`` is alive, so the caller keeps ``buf``."""
    if isinstance(buf, bytearray):
        return memoryview(buf)
    assert buf.dtype == torch.uint8 and buf.is_contiguous() and buf.device.type == "cpu"
    if buf.numel() == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * buf.numel()).from_address(buf.data_ptr())).cast("B")
