"""Turning bytes into torch tensors without copies, and the dtype tables that need torch."""

from __future__ import annotations

from typing import Any

import torch

from .header import TensorInfo

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def view_bytes(buffer: Any, info: TensorInfo, rows: tuple[int, int] | None) -> torch.Tensor:
    """A tensor viewing ``info``'s bytes in ``buffer`` (mmap, bytes-like, uint8 tensor), or rows ``[a, b)``.

    The view is zero-copy when the offset is aligned to the element size; safetensors does not promise that,
    so a misaligned tensor is copied.
    """
    dtype = TORCH_DTYPES[info.dtype]
    start, shape = info.start, list(info.shape)
    if rows is not None:
        start += rows[0] * info.row_bytes
        shape[0] = rows[1] - rows[0]
    count = 1
    for d in shape:
        count *= d
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if isinstance(buffer, torch.Tensor):  # a uint8 read buffer (buffers.py)
        part = buffer[start : start + count * itemsize]
        return (part.clone() if start % itemsize else part).view(dtype).view(shape)
    if start % itemsize:
        raw = bytearray(memoryview(buffer).cast("B")[start : start + count * itemsize])
        return torch.frombuffer(raw, dtype=dtype, count=count).view(shape)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=start).view(shape)
