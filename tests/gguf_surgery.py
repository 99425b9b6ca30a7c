"""Copy a real GGUF model with one string metadata value replaced (for example a
hostile ``tokenizer.chat_template``), by rewriting the header and re-aligning
the tensor data that follows it."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8 : pos + 8 + n].decode("utf-8", "replace"), pos + 8 + n


def _skip_value(buf: bytes, pos: int, vtype: int) -> int:
    if vtype in _SCALAR:
        return pos + _SCALAR[vtype]
    if vtype == 8:
        return _string(buf, pos)[1]
    if vtype == 9:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _SCALAR:
            return pos + _SCALAR[etype] * count
        for _ in range(count):
            pos = _skip_value(buf, pos, etype)
        return pos
    raise ValueError(f"unknown GGUF value type {vtype}")


def _encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def copy_with_metadata(src: Path, dst: Path, key: str, value: str, header_bytes: int = 8 << 20) -> Path:
    """Write ``dst``: ``src`` with string metadata ``key`` set to ``value`` (added if missing)."""
    with open(src, "rb") as f:
        head = f.read(header_bytes)
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", head, 0)
    assert magic == b"GGUF" and version >= 2
    pos, alignment = 24, 32
    out = bytearray(head[:24])
    found = False
    for _ in range(n_kv):
        start = pos
        name, pos = _string(head, pos)
        (vtype,) = struct.unpack_from("<I", head, pos)
        end = _skip_value(head, pos + 4, vtype)
        if name == "general.alignment":
            (alignment,) = struct.unpack_from("<I", head, pos + 4)
        if name == key:
            out += _encode_string(name) + struct.pack("<I", 8) + _encode_string(value)
            found = True
        else:
            out += head[start:end]
        pos = end
    if not found:
        out += _encode_string(key) + struct.pack("<I", 8) + _encode_string(value)
        struct.pack_into("<Q", out, 16, n_kv + 1)
    infos_start = pos
    for _ in range(n_tensors):
        _, pos = _string(head, pos)
        (n_dims,) = struct.unpack_from("<I", head, pos)
        pos += 4 + 8 * n_dims + 4 + 8
    out += head[infos_start:pos]
    old_data = pos + (-pos % alignment)
    out += b"\0" * (-len(out) % alignment)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(out)
        fin.seek(old_data)
        shutil.copyfileobj(fin, fout, 1 << 20)
    return dst
