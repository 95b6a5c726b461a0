"""Safetensors headers and sharded indexes, parsed and checked without touching tensor data.

The format: 8 bytes little-endian header length N, N bytes of JSON
(``{name: {dtype, shape, data_offsets}}`` plus an optional ``__metadata__`` of str -> str), then the data
section. Offsets are relative to the data section.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from ..errors import HeaderError

# safetensors dtype code -> bytes per element. Kept free of torch so planning stays light.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# Valid safetensors dtypes that hubmerge does not read: micro-scaling floats (MXFP4's F4 values and F8_E8M0
# scales), the FNUZ float8 variants, complex numbers. A file holding them is a valid file, not a corrupt one.
UNSUPPORTED_DTYPES = frozenset({"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"})

# Recipe dtype names <-> safetensors codes.
DTYPE_CODES: dict[str, str] = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
DTYPE_NAMES: dict[str, str] = {code: name for name, code in DTYPE_CODES.items()}

MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
_CORRUPT = "the file is corrupt or not written by safetensors; download or save it again"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a header describes it. ``start``/``end`` are absolute byte offsets in ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_bytes(self) -> int:
        """Bytes in one row (one index of the first dimension)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: tensors in file order, metadata, and where the data section starts."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def header_length(prefix: bytes, *, file: str, file_size: int) -> int:
    """Read the 8-byte header length and check it against the file size.

    Raises:
        HeaderError: the file is shorter than 8 bytes or the declared length does not fit.
    """
    if len(prefix) < 8:
        raise HeaderError(
            f"{file}: only {len(prefix)} bytes long, a safetensors file starts with an 8-byte header length",
            location=file,
            hint="the file is truncated; download or save it again",
        )
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise HeaderError(
            f"{file}: header declares {n} bytes but the file has {file_size - 8} after the length field",
            location=file,
            hint="the file is truncated or not a safetensors file; download or save it again",
        )
    return int(n)


def parse_header(raw: bytes, *, file: str, file_size: int | None) -> Header:
    """Parse and validate the JSON header of a safetensors file.

    Args:
        raw: the header bytes (after the 8-byte length).
        file: file name for messages and for :attr:`TensorInfo.file`.
        file_size: total size of the file, to check that offsets stay inside it and that the data fills it;
            None where it is not known (a Hub listing without sizes).

    Returns:
        The header with absolute offsets, tensors ordered by their position in the file.

    Raises:
        HeaderError: bad JSON, unknown dtype, wrong sizes, overlapping or out-of-range offsets.
    """
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(
            f"{file}: header is not valid JSON ({exc})",
            location=file,
            hint="the file is corrupt; download or save it again",
        ) from None
    if not isinstance(doc, dict):
        raise HeaderError(
            f"{file}: header is a JSON {type(doc).__name__}, expected an object", location=file, hint=_CORRUPT
        )
    data_start = 8 + len(raw)
    data_size = file_size - data_start if file_size is not None else None
    metadata = _metadata(doc.pop("__metadata__", None), file=file)
    tensors = [_tensor(name, entry, file=file, data_start=data_start) for name, entry in doc.items()]
    tensors.sort(key=lambda t: (t.start, t.end))
    previous: TensorInfo | None = None
    at = data_start  # where the next tensor must begin: safetensors lays them end to end from the start
    for info in tensors:
        if data_size is not None and info.end - data_start > data_size:
            raise HeaderError(
                f"{file}: tensor '{info.name}' ends at byte {info.end - data_start} of the data section, "
                f"which has only {data_size} bytes",
                location=file,
                hint="the file is truncated; download or save it again",
            )
        if previous is not None and info.start < previous.end:
            raise HeaderError(
                f"{file}: tensors '{previous.name}' and '{info.name}' overlap "
                f"(bytes {previous.start - data_start}-{previous.end - data_start} and "
                f"{info.start - data_start}-{info.end - data_start})",
                location=file,
                hint="the file is corrupt; save it again with safetensors",
            )
        if info.start != at:  # a gap: the safetensors library refuses such a file, so transformers does
            raise HeaderError(
                f"{file}: {info.start - at} bytes of the data section (from byte {at - data_start}) belong "
                f"to no tensor, before '{info.name}'; safetensors lays tensors end to end",
                location=file,
                hint=_CORRUPT,
            )
        at = info.end
        previous = info
    if file_size is not None and at != file_size:
        raise HeaderError(
            f"{file}: {file_size - at} bytes follow the last tensor's data; safetensors files end with it",
            location=file,
            hint=_CORRUPT,
        )
    return Header(tensors={t.name: t for t in tensors}, metadata=metadata, data_start=data_start)


def _metadata(value: Any, *, file: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise HeaderError(f"{file}: __metadata__ must map strings to strings", location=file, hint=_CORRUPT)
    return dict(value)


def _tensor(name: str, entry: Any, *, file: str, data_start: int) -> TensorInfo:
    where = f"{file}: tensor '{name}'"
    if not isinstance(entry, dict):
        raise HeaderError(
            f"{where}: expected an object with dtype, shape, data_offsets", location=file, hint=_CORRUPT
        )
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if isinstance(dtype, str) and dtype in UNSUPPORTED_DTYPES:
        raise HeaderError(
            f"{where}: hubmerge does not support dtype {dtype}, a valid safetensors dtype (it reads "
            f"{', '.join(code for code in DTYPE_SIZES if code in FLOAT_DTYPES)}, integers and BOOL)",
            location=file,
            hint="convert the checkpoint to one of those dtypes first (dequantize a quantized model); the "
            "file is refused as it opens, so a `skip:` rule cannot leave this tensor out",
        )
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # a list or an object would not even hash
        raise HeaderError(
            f"{where}: unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_SIZES)}",
            location=file,
            hint=_CORRUPT,
        )
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise HeaderError(
            f"{where}: shape {shape!r} is not a list of non-negative integers", location=file, hint=_CORRUPT
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise HeaderError(
            f"{where}: data_offsets {offsets!r} must be [begin, end] with begin <= end",
            location=file,
            hint=_CORRUPT,
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise HeaderError(
            f"{where}: shape {shape} of {dtype} needs {expected} bytes but data_offsets span "
            f"{offsets[1] - offsets[0]}",
            location=file,
            hint="the file is corrupt; save it again with safetensors",
        )
    return TensorInfo(name, dtype, tuple(shape), file, data_start + offsets[0], data_start + offsets[1])


def parse_index(raw: bytes, *, file: str) -> dict[str, str]:
    """Parse a ``model.safetensors.index.json`` and return its weight map (tensor name -> shard file).

    Raises:
        HeaderError: not JSON, or no ``weight_map`` of str -> str.
    """
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(
            f"{file}: not valid JSON ({exc})", location=file, hint="regenerate the index"
        ) from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise HeaderError(
            f"{file}: expected an object with a 'weight_map' of tensor name -> shard file",
            location=file,
            hint="regenerate the index",
        )
    for name, shard in weight_map.items():
        relative = PurePosixPath(shard.replace("\\", "/"))
        if not relative.parts or relative.is_absolute() or ".." in relative.parts:  # in the model's folder
            raise HeaderError(
                f"{file}: maps '{name}' to {shard!r}, outside the model's folder",
                location=file,
                hint="regenerate the index: shard names are file names in the model's folder",
            )
    return dict(weight_map)
