"""Bounded reader for the header of a GGUF model file.

Describes a model (architecture, context length, quantization, chat template,
parameter count, ...) from the file's metadata and tensor-info table without
loading the model or reading tensor data.

The reader is written for untrusted files: every count and length is checked
against the bytes that remain in the file (and against ``max_metadata_bytes``)
before anything is read or allocated, arrays are nested at most
``MAX_ARRAY_DEPTH`` deep, large arrays are skipped rather than decoded, and
every problem with the file's content surfaces as a :class:`GGUFError` with a
short human reason. Errors opening or reading the file itself (missing file,
permission denied) are raised as the usual :class:`OSError`.

Format (GGUF v2/v3, little-endian): magic ``b"GGUF"``, u32 version, u64 tensor
count, u64 metadata key/value count; the key/values (u64-length-prefixed UTF-8
key, u32 value type, value); the tensor infos (name, u32 n_dims, n_dims x u64
dims, u32 ggml type, u64 offset relative to the data section); then the
tensor data, aligned to ``general.alignment`` (default 32).
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

__all__ = [
    "ArraySummary",
    "GGUFError",
    "GGUFHeader",
    "MAX_ARRAY_DEPTH",
    "MAX_KEPT_ARRAY_LENGTH",
    "MAX_TENSOR_DIMS",
    "is_gguf",
    "parse_gguf_header",
    "read_gguf_header",
]

GGUF_MAGIC: Final = b"GGUF"
DEFAULT_ALIGNMENT: Final = 32
#: Arrays with at most this many elements are kept in full; longer ones are summarised.
MAX_KEPT_ARRAY_LENGTH: Final = 64
#: Deepest nesting of arrays inside arrays that is accepted.
MAX_ARRAY_DEPTH: Final = 4
#: Most dimensions a tensor may declare.
MAX_TENSOR_DIMS: Final = 8

_CHUNK: Final = 64 * 1024
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")
_ARRAY_HEADER: Final = struct.Struct("<IQ")  # element type, element count
_TENSOR_TAIL: Final = struct.Struct("<IQ")  # ggml type, data offset
_COUNTS: Final = struct.Struct("<QQ")  # tensor count, metadata key/value count
_FIXED_HEADER_SIZE: Final = 4 + 4 + 8 + 8
# Smallest possible encodings, used to reject counts that cannot fit in the file.
_MIN_KV_BYTES: Final = 8 + 4 + 1  # empty key, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES: Final = 8 + 4 + 4 + 8  # empty name, n_dims=0, type, offset

_STRING: Final = 8
_ARRAY: Final = 9
_VALUE_TYPE_NAMES: Final[dict[int, str]] = {
    0: "uint8",
    1: "int8",
    2: "uint16",
    3: "int16",
    4: "uint32",
    5: "int32",
    6: "float32",
    7: "bool",
    8: "string",
    9: "array",
    10: "uint64",
    11: "int64",
    12: "float64",
}
_SCALAR_FORMATS: Final[dict[int, str]] = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_SCALAR_STRUCTS: Final = {t: struct.Struct("<" + f) for t, f in _SCALAR_FORMATS.items()}

# ggml tensor type -> (elements per block, bytes per block), after ggml's type traits.
# Types missing here (removed or newer than this table) are accepted without a size check.
_GGML_BLOCK_SIZES: Final[dict[int, tuple[int, int]]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 40),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
    40: (64, 36),  # NVFP4
    41: (128, 18),  # Q1_0
}

# general.file_type (llama.cpp's llama_ftype) -> quantization label.
FILE_TYPE_LABELS: Final[dict[int, str]] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4",
    39: "NVFP4",
    40: "Q1_0",
}


class GGUFError(ValueError):
    """The file is not a readable GGUF file.

    ``str(e)`` is a short human reason, e.g. ``'not a GGUF file (bad magic)'``,
    ``'truncated header'`` or ``'tensor count too large'``.
    """


@dataclass(frozen=True)
class ArraySummary:
    """Stands in for a metadata array too long to keep (e.g. a tokenizer vocabulary)."""

    element_type: str
    length: int

    def __str__(self) -> str:
        return f"[{self.element_type} x {self.length}]"


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says about itself, read without loading tensor data.

    ``metadata`` holds every key. Scalars are ``int``, ``float``, ``bool`` or
    ``str``; arrays of at most ``MAX_KEPT_ARRAY_LENGTH`` elements are lists
    (an array nested in an array is always an :class:`ArraySummary`); longer
    arrays are :class:`ArraySummary` objects. ``parameter_count`` is the sum
    over tensors of their element counts, or ``None`` for a file without
    tensors (e.g. a vocabulary-only file).
    """

    version: int
    tensor_count: int
    metadata: dict[str, object]
    file_size: int
    parameter_count: int | None
    tensors: tuple[tuple[str, int], ...] = ()  # (name, bytes) of each tensor, with keep_tensors=True

    def _str(self, key: str) -> str | None:
        value = self.metadata.get(key)
        return value if isinstance(value, str) else None

    def _int(self, key: str) -> int | None:
        value = self.metadata.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def architecture(self) -> str | None:
        """``general.architecture``, e.g. ``'llama'`` or ``'clip'``."""
        return self._str("general.architecture")

    @property
    def name(self) -> str | None:
        """``general.name``."""
        return self._str("general.name")

    @property
    def model_type(self) -> str | None:
        """``general.type``, e.g. ``'model'``, ``'adapter'`` or ``'mmproj'``."""
        return self._str("general.type")

    @property
    def context_length(self) -> int | None:
        """``{architecture}.context_length``: the context the model was trained for."""
        arch = self.architecture
        return self._int(f"{arch}.context_length") if arch else None

    @property
    def file_type_label(self) -> str | None:
        """``general.file_type`` as llama.cpp's quantization label (``'Q4_K_M'``, ...)."""
        file_type = self._int("general.file_type")
        if file_type is None:
            return None
        return FILE_TYPE_LABELS.get(file_type, f"type {file_type}")

    @property
    def size_label(self) -> str | None:
        """``general.size_label``, e.g. ``'135M'``."""
        return self._str("general.size_label")

    @property
    def chat_template(self) -> str | None:
        """``tokenizer.chat_template``, in full."""
        return self._str("tokenizer.chat_template")

    @property
    def has_chat_template(self) -> bool:
        """Whether the file carries a non-empty chat template."""
        return bool(self.chat_template)

    @property
    def bos_token_id(self) -> int | None:
        """``tokenizer.ggml.bos_token_id``."""
        return self._int("tokenizer.ggml.bos_token_id")

    @property
    def eos_token_id(self) -> int | None:
        """``tokenizer.ggml.eos_token_id``."""
        return self._int("tokenizer.ggml.eos_token_id")


class _Cursor:
    """Sequential reader over a seekable binary stream with explicit bounds.

    Reads go through an internal window, refilled ``_CHUNK`` bytes at a time,
    so that small fields cost no system call. Every read or skip is checked
    against the end of the file and against the header budget first; the
    window itself never extends past either.
    """

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self._size = size
        self._limit = size
        self._limit_error = "truncated header"
        self._buf = b""
        self._off = 0  # read position inside _buf
        self._buf_pos = 0  # file offset of _buf[0]

    @property
    def pos(self) -> int:
        """Current file offset."""
        return self._buf_pos + self._off

    @property
    def size(self) -> int:
        """Size of the file in bytes."""
        return self._size

    def set_budget(self, max_bytes: int) -> None:
        """Allow at most ``max_bytes`` more bytes to be read or skipped."""
        if self.pos + max_bytes < self._size:
            self._limit = self.pos + max_bytes
            self._limit_error = f"header larger than max_metadata_bytes ({max_bytes})"

    def require(self, n: int, reason: str = "truncated header") -> None:
        """Raise ``GGUFError(reason)`` unless ``n`` more bytes lie inside the file and budget."""
        end = self.pos + n
        if end > self._size:
            raise GGUFError(reason)
        if end > self._limit:
            raise GGUFError(self._limit_error)

    def read(self, n: int, reason: str = "truncated header") -> bytes:
        """Read exactly ``n`` bytes."""
        self.require(n, reason)
        self._fill(n)
        start = self._off
        self._off += n
        return self._buf[start : self._off]

    def unpack(self, st: struct.Struct) -> tuple[Any, ...]:
        """Read and unpack one ``st``-shaped record."""
        self.require(st.size)
        self._fill(st.size)
        values = st.unpack_from(self._buf, self._off)
        self._off += st.size
        return values

    def u32(self) -> int:
        """Read a little-endian u32."""
        value: int = self.unpack(_U32)[0]
        return value

    def u64(self) -> int:
        """Read a little-endian u64."""
        value: int = self.unpack(_U64)[0]
        return value

    def skip(self, n: int, reason: str = "truncated header") -> None:
        """Move ``n`` bytes forward, seeking past the window when needed."""
        self.require(n, reason)
        if self._off + n <= len(self._buf):
            self._off += n
            return
        target = self.pos + n
        self._f.seek(target)
        self._buf, self._off, self._buf_pos = b"", 0, target

    def string(self) -> str:
        """Read a length-prefixed string; invalid UTF-8 is replaced, not an error."""
        length = self.u64()
        return self.read(length, "string length past end of file").decode("utf-8", "replace")

    def skip_strings(self, count: int) -> None:
        """Skip ``count`` length-prefixed strings without decoding them.

        Walks the lengths of all strings that lie wholly inside the window in a
        tight loop; a string that straddles the window's end goes through the
        checked path, which refills the window or seeks past a long string.
        """
        unpack_from = _U64.unpack_from
        remaining = count
        while remaining:
            buf, off = self._buf, self._off
            size = len(buf)
            end = size - 8
            while remaining and off <= end:
                after = off + 8 + unpack_from(buf, off)[0]
                if after > size:
                    break
                off = after
                remaining -= 1
            self._off = off
            if remaining:
                self.skip(self.u64(), "string length past end of file")
                remaining -= 1

    def _fill(self, n: int) -> None:
        """Make ``n`` bytes available at ``_off``; the caller has checked the bounds."""
        available = len(self._buf) - self._off
        if available >= n:
            return
        window_end = self._buf_pos + len(self._buf)
        want = min(max(n - available, _CHUNK), self._limit - window_end)
        parts = [self._buf[self._off :]]
        got = 0
        while got < want:
            data = self._f.read(want - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        if available + got < n:
            raise GGUFError("truncated header")  # the file shrank while being read
        self._buf = b"".join(parts)
        self._buf_pos += self._off
        self._off = 0


def _read_value(cur: _Cursor, value_type: int) -> object:
    """Read one top-level metadata value of type ``value_type``."""
    st = _SCALAR_STRUCTS.get(value_type)
    if st is not None:
        return cur.unpack(st)[0]
    if value_type == _STRING:
        return cur.string()
    if value_type == _ARRAY:
        return _read_array(cur, depth=1, keep=True)
    raise GGUFError(f"unknown metadata value type {value_type}")


def _read_array(cur: _Cursor, *, depth: int, keep: bool) -> list[object] | ArraySummary:
    """Read an array's header and elements.

    Returns the elements as a list when ``keep`` is set and the array has at
    most ``MAX_KEPT_ARRAY_LENGTH`` elements; otherwise skips the elements and
    returns an :class:`ArraySummary`. Arrays nested inside arrays are never
    kept in full, which bounds the memory a hostile file can claim.
    """
    if depth > MAX_ARRAY_DEPTH:
        raise GGUFError("arrays nested too deeply")
    element_type, count = cur.unpack(_ARRAY_HEADER)
    type_name = _VALUE_TYPE_NAMES.get(element_type)
    if type_name is None:
        raise GGUFError(f"unknown array element type {element_type}")
    st = _SCALAR_STRUCTS.get(element_type)
    min_element_size = st.size if st is not None else 8 if element_type == _STRING else 12
    cur.require(count * min_element_size, "array length too large")
    keep = keep and count <= MAX_KEPT_ARRAY_LENGTH

    if st is not None:
        if keep:
            return list(cur.unpack(struct.Struct(f"<{count}{st.format[1:]}")))
        cur.skip(count * st.size)
    elif element_type == _STRING:
        if keep:
            return [cur.string() for _ in range(count)]
        cur.skip_strings(count)
    elif keep:
        return [_read_array(cur, depth=depth + 1, keep=False) for _ in range(count)]
    else:
        for _ in range(count):
            _read_array(cur, depth=depth + 1, keep=False)
    return ArraySummary(type_name, count)


def _read_metadata(cur: _Cursor, kv_count: int) -> dict[str, object]:
    metadata: dict[str, object] = {}
    for _ in range(kv_count):
        key = cur.string()
        if key in metadata:
            raise GGUFError(f"duplicate metadata key {key!r}")
        metadata[key] = _read_value(cur, cur.u32())
    return metadata


def _alignment(metadata: dict[str, object]) -> int:
    value = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value & (value - 1):
        raise GGUFError("invalid general.alignment")
    return value


def _read_tensor_infos(cur: _Cursor, tensor_count: int, alignment: int,
                       sizes: list[tuple[str, int]] | None = None) -> int:
    """Walk the tensor-info table; check each tensor's data lies inside the file.

    Returns the total number of elements over all tensors; appends (name, bytes) of each to ``sizes``.
    """
    total_elements = 0
    data_end = 0  # end of the furthest tensor, relative to the data section
    last_name = ""
    for _ in range(tensor_count):
        name = cur.string()
        n_dims = cur.u32()
        if n_dims > MAX_TENSOR_DIMS:
            raise GGUFError(f"tensor {name!r} has too many dimensions ({n_dims})")
        dims = cur.unpack(struct.Struct(f"<{n_dims}Q"))
        ggml_type, offset = cur.unpack(_TENSOR_TAIL)
        elements = 1
        for dim in dims:
            elements *= dim
        total_elements += elements
        if offset % alignment:
            raise GGUFError(f"tensor {name!r} data offset is not aligned")
        block = _GGML_BLOCK_SIZES.get(ggml_type)
        nbytes = 0
        if block is not None:
            block_elements, block_bytes = block
            if n_dims and dims[0] % block_elements:
                raise GGUFError(f"tensor {name!r} rows do not fill whole blocks")
            nbytes = elements // block_elements * block_bytes
        if sizes is not None:
            sizes.append((name, nbytes))
        if offset + nbytes > data_end:
            data_end = offset + nbytes
            last_name = name
    data_start = -(-cur.pos // alignment) * alignment
    if data_end and data_start + data_end > cur.size:
        raise GGUFError(f"tensor data past end of file (tensor {last_name!r}; truncated download?)")
    return total_elements


def parse_gguf_header(f: BinaryIO, *, max_metadata_bytes: int = 64 * 1024 * 1024,
                      keep_tensors: bool = False) -> GGUFHeader:
    """Parse the GGUF header of the seekable binary stream ``f`` (from offset 0).

    Reads and skips at most ``max_metadata_bytes`` past the fixed 24-byte
    header (metadata plus tensor-info table); a larger header is a
    :class:`GGUFError`. Tensor data is never read.
    """
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    cur = _Cursor(f, size)
    if cur.read(4, "not a GGUF file (too short)") != GGUF_MAGIC:
        raise GGUFError("not a GGUF file (bad magic)")
    version = cur.u32()
    if version not in (2, 3):
        if version & 0xFFFF == 0 and (version >> 24) in (2, 3):
            raise GGUFError("big-endian GGUF files are not supported")
        raise GGUFError(f"unsupported GGUF version {version}")
    tensor_count, kv_count = cur.unpack(_COUNTS)
    room = size - _FIXED_HEADER_SIZE
    if kv_count * _MIN_KV_BYTES > room:
        raise GGUFError("metadata key count too large")
    if tensor_count * _MIN_TENSOR_INFO_BYTES > room - kv_count * _MIN_KV_BYTES:
        raise GGUFError("tensor count too large")
    cur.set_budget(max_metadata_bytes)
    cur.require(kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES)

    metadata = _read_metadata(cur, kv_count)
    sizes: list[tuple[str, int]] | None = [] if keep_tensors else None
    total_elements = _read_tensor_infos(cur, tensor_count, _alignment(metadata), sizes)
    return GGUFHeader(
        version=version,
        tensor_count=tensor_count,
        metadata=metadata,
        file_size=size,
        parameter_count=total_elements if tensor_count else None,
        tensors=tuple(sizes or ()),
    )


def read_gguf_header(
    path: str | os.PathLike[str], *, max_metadata_bytes: int = 64 * 1024 * 1024, keep_tensors: bool = False
) -> GGUFHeader:
    """Read the header of the GGUF file at ``path`` (see :func:`parse_gguf_header`).

    Raises :class:`GGUFError` when the file is not a readable GGUF file (a
    directory, FIFO or device counts as one) and :class:`OSError` when it
    cannot be opened or read.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise GGUFError("not a regular file")
    with open(path, "rb") as f:
        return parse_gguf_header(f, max_metadata_bytes=max_metadata_bytes, keep_tensors=keep_tensors)


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file starting with the GGUF magic; never raises."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except (OSError, ValueError):
        return False
