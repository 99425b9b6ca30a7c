"""Bounded reader for the JSON header of a SafeTensors file.

Describes the tensors (names, dtypes, shapes, parameter count) without
reading tensor data and without importing torch or safetensors.

Format: a little-endian u64 ``N``, then ``N`` bytes of UTF-8 JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the byte after the header) plus an optional ``"__metadata__"``
object of strings; then the tensor data.

Written for untrusted files: the header length is checked against the file
size and ``max_header_bytes`` before anything is read, every entry is checked
(known dtype, at most ``MAX_DIMS`` non-negative dimensions, offsets inside the
data section and matching the shape), and every problem surfaces as a
:class:`SafeTensorsError` with a short human reason.  Errors opening or reading
the file itself are the usual :class:`OSError`.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

__all__ = ["DTYPE_BYTES", "MAX_DIMS", "SafeTensorsError", "SafeTensorsHeader", "read_safetensors_header"]

#: The format's own limit on the JSON header (100 MB).
MAX_HEADER_BYTES: Final = 100 * 1024 * 1024
MAX_DIMS: Final = 8
#: Bits per element of every dtype the format defines (sub-byte types are packed).
DTYPE_BITS: Final[dict[str, int]] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
DTYPE_BYTES: Final = {k: v / 8 for k, v in DTYPE_BITS.items()}
_U64: Final = struct.Struct("<Q")


class SafeTensorsError(ValueError):
    """The file is not a readable SafeTensors file; ``str(e)`` is a short reason."""


@dataclass(frozen=True)
class SafeTensorsHeader:
    """What a SafeTensors file says about itself."""

    tensor_names: tuple[str, ...]
    parameter_count: int
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> parameters stored in it
    metadata: dict[str, str] = field(default_factory=dict)
    file_size: int = 0
    tensors: tuple[tuple[str, str, int], ...] = ()  # (name, dtype, elements) with keep_tensors=True

    @property
    def main_dtype(self) -> str | None:
        """The dtype that holds the most parameters (``'BF16'``...)."""
        return max(self.dtypes, key=self.dtypes.__getitem__) if self.dtypes else None


def _check_entry(name: str, entry: object, data_size: int) -> tuple[str, int]:
    if not isinstance(entry, dict):
        raise SafeTensorsError(f"tensor {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise SafeTensorsError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise SafeTensorsError(f"tensor {name!r} has an invalid shape")
    elements = 1
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise SafeTensorsError(f"tensor {name!r} has an invalid shape")
        elements *= dim
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise SafeTensorsError(f"tensor {name!r} has invalid data_offsets")
    if offsets[1] > data_size:
        raise SafeTensorsError(f"tensor data past end of file (tensor {name!r}; truncated download?)")
    if offsets[1] - offsets[0] != -(-elements * DTYPE_BITS[dtype] // 8):
        raise SafeTensorsError(f"tensor {name!r} data size does not match its shape")
    return dtype, elements


def read_safetensors_header(
    path: str | os.PathLike[str], *, max_header_bytes: int = MAX_HEADER_BYTES, keep_tensors: bool = False
) -> SafeTensorsHeader:
    """Read and check the header of the SafeTensors file at ``path``; never reads tensor data."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise SafeTensorsError("not a regular file")
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafeTensorsError("not a SafeTensors file (too short)")
        (length,) = _U64.unpack(prefix)
        if length > size - 8:
            raise SafeTensorsError("header length past end of file (truncated download?)")
        if length > max_header_bytes:
            raise SafeTensorsError(f"header larger than {max_header_bytes} bytes")
        raw = f.read(length)
    if len(raw) != length:
        raise SafeTensorsError("truncated header")
    if not raw.lstrip()[:1] == b"{":
        raise SafeTensorsError("not a SafeTensors file (header is not a JSON object)")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, huge integers, deep nesting
        raise SafeTensorsError(f"header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise SafeTensorsError("not a SafeTensors file (header is not a JSON object)")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise SafeTensorsError("__metadata__ is not an object")
    data_size = size - 8 - length
    dtypes: Counter[str] = Counter()
    kept = []
    for name, entry in doc.items():
        dtype, elements = _check_entry(name, entry, data_size)
        dtypes[dtype] += elements
        if keep_tensors:
            kept.append((name, dtype, elements))
    return SafeTensorsHeader(
        tensor_names=tuple(doc),
        parameter_count=sum(dtypes.values()),
        dtypes=dict(dtypes),
        metadata={str(k): str(v) for k, v in meta.items()},
        file_size=size,
        tensors=tuple(kept),
    )
