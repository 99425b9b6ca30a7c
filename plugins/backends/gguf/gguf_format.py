"""The GGUF model format, as discovery sees it: what a ``.gguf`` file is, read from its
header only (:mod:`shimmy_plugins.backends.gguf.gguf_header`), and split sets
(``model-00001-of-00003.gguf``...) described as one model loaded from the first part.

A file that is not a language model (a LoRA adapter, a vision projector, a speech or
diffusion model, a vocabulary) is skipped with its reason.  Encoders (BERT and its family) and
models whose header declares a pooling type are listed as ``embedding`` models; those with a
classifier head or rank pooling as ``rerank`` models (:func:`gguf_kind`).  A file named
explicitly (``--model``, ``shimmy add``, an Ollama blob) is read as GGUF whatever its name,
as llama.cpp does.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from shimmy_core.plugin_api import ADAPTER, CORRUPT, DIFFUSION, INCOMPLETE, NOT_A_MODEL, PROJECTOR, SPEECH
from shimmy_core.plugin_api import CHAT, EMBEDDING_KIND, RERANK, HeaderCache, ModelFacts, Recognized, Skip, stat_key
from shimmy_core.plugin_api import UNSUPPORTED
from shimmy_plugins.backends.gguf.gguf_header import GGUFError, GGUFHeader, read_gguf_header

NOT_GGUF = "not-gguf"   # skip category: named .gguf, but no GGUF magic
SPLIT_RE = re.compile(r"^(?P<base>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
OLD_GGML = {".ggml": "old GGML format: convert it to GGUF", ".ggmlv3": "old GGML format: convert it to GGUF"}

SPEECH_ARCHS = {"whisper", "wav2vec2", "hubert", "wavtokenizer-dec", "encodec", "parakeet"}
DIFFUSION_ARCHS = {
    "flux", "sd1", "sd2", "sdxl", "sd3", "stable-diffusion", "unet", "vae", "aura", "ltxv",
    "hyvid", "wan", "hidream", "cosmos", "lumina2", "chroma", "qwen_image",
}
EMBEDDING_ARCHS = {
    "bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert", "neo-bert",
    "roberta", "xlm-roberta", "t5encoder", "gemma-embedding",
}
# llama.cpp's enum llama_pooling_type, as ``{arch}.pooling_type`` stores it
POOLING_NONE, POOLING_MEAN, POOLING_CLS, POOLING_LAST, POOLING_RANK = 0, 1, 2, 3, 4
MATRYOSHKA_KEY = "shimmy.matryoshka_dimensions"  # Shimmy's key: the sizes an embedding model was trained to be cut to


class GGUFFormat:
    """``.gguf`` files and split sets (and old ``.ggml`` files, refused with a hint)."""

    name = "gguf"
    suffixes = (".gguf", *OLD_GGML)

    def inspect_folder(self, folder: Path, names: Any, headers: HeaderCache) -> Recognized | None:
        return None  # GGUF models are files

    def inspect_files(self, folder: Path, files: Sequence[Path], headers: HeaderCache) -> Iterable[Recognized]:
        out: list[Recognized] = []
        splits: dict[tuple[str, int], dict[int, Path]] = {}
        for path in files:
            if not path.name.lower().endswith(".gguf"):  # an old GGML file
                out.append(Recognized(path, Skip(OLD_GGML[os.path.splitext(path.name.lower())[1]], UNSUPPORTED),
                                      path.name))
                continue
            match = SPLIT_RE.match(path.name)
            if match:
                key = (match.group("base"), int(match.group("count")))
                splits.setdefault(key, {})[int(match.group("no"))] = path
                continue
            out.append(Recognized(path, self.describe(path, headers), gguf_stem(path.name), file_names(path)))
        for (base, count), parts in splits.items():
            out.append(self._split_set(folder, base, count, parts, headers))
        return out

    def inspect_path(self, path: Path, headers: HeaderCache) -> Recognized:
        match = SPLIT_RE.match(path.name)
        if not match:
            return Recognized(path, self.describe(path, headers), gguf_stem(path.name), file_names(path))
        base, count = match.group("base"), int(match.group("count"))
        found = self._split_set(path.parent, base, count, split_parts(path.parent, base, count), headers)
        if int(match.group("no")) != 1:
            return Recognized(path, Skip(f"part {int(match.group('no'))} of a split model: name the first part "
                                         f"({found.path.name})", NOT_A_MODEL), found.stem)
        return found

    # ---------------------------------------------------------------- one file, one set
    def describe(self, path: Path, headers: HeaderCache) -> ModelFacts | Skip:
        """One GGUF file (not part of a split set)."""
        read = headers.read_header("gguf", path, _read)
        if isinstance(read, Skip):
            return read
        st, header = read

        def describe() -> ModelFacts | Skip:
            return classify_gguf(header, path.name) or _gguf_facts(path, header, st.st_size, int(st.st_mtime), ())

        return headers.cached("gguf-model", path, stat_key(st), describe)

    def _split_set(self, directory: Path, base: str, count: int, parts: dict[int, Path],
                   headers: HeaderCache) -> Recognized:
        first = parts.get(1) or directory / f"{base}-00001-of-{count:05d}.gguf"
        return Recognized(first, self.describe_split(parts, count, headers), base, file_names(first) + (base,))

    def describe_split(self, parts: dict[int, Path], count: int, headers: HeaderCache) -> ModelFacts | Skip:
        """A split GGUF set (``-00001-of-00003.gguf``...) as one model loaded from part 1."""
        missing = [n for n in range(1, count + 1) if n not in parts]
        if missing:
            shown = ", ".join(str(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
            return Skip(f"incomplete split model: part(s) {shown} of {count} missing", INCOMPLETE)
        first = parts[1]
        found: list[GGUFHeader] = []
        size = created = 0
        for number in range(1, count + 1):
            read = headers.read_header("gguf", parts[number], _read)
            if isinstance(read, Skip):
                return Skip(f"split part {number} of {count}: {read.reason}", read.category)
            st, header = read
            found.append(header)
            size += st.st_size
            created = max(created, int(st.st_mtime))
        skip = classify_gguf(found[0], first.name, split=True)
        if skip:
            return skip
        facts = _gguf_facts(first, found[0], size, created, parts=tuple(str(parts[n]) for n in sorted(parts)))
        counts = [h.parameter_count for h in found if h.parameter_count]
        if counts:
            facts = replace(facts, parameters=sum(counts))
        return facts


# ------------------------------------------------------------------ names
def gguf_stem(name: str) -> str:
    """``model.Q4_K_M.gguf`` -> ``model.Q4_K_M``; ``x-00001-of-00002.gguf`` -> ``x``."""
    match = SPLIT_RE.match(name)
    if match:
        return match.group("base")
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def file_names(path: Path) -> tuple[str, ...]:
    """The names a request may use for a model file: its name with and without ``.gguf``."""
    if path.name.lower().endswith(".gguf"):
        return (path.name, path.name[: -len(".gguf")])
    return (path.name,)


def split_parts(directory: Path, base: str, count: int) -> dict[int, Path]:
    """The parts of the split set ``base-NNNNN-of-<count>.gguf`` present in ``directory``."""
    pattern = re.compile(re.escape(base) + r"-(\d{5})-of-" + f"{count:05d}" + r"\.gguf$", re.IGNORECASE)
    parts: dict[int, Path] = {}
    try:
        with os.scandir(directory) as it:
            for entry in it:
                m = pattern.match(entry.name)
                if m:
                    parts[int(m.group(1))] = Path(entry.path)
    except OSError:
        pass
    return parts


def parse_size_label(label: str | None) -> int | None:
    """``'135M'`` -> 135_000_000; ``'8x7B'`` -> 56_000_000_000; anything else -> ``None``."""
    match = re.fullmatch(r"(?:(\d+)x)?(\d+(?:\.\d+)?)([KMBT])", (label or "").strip(), re.IGNORECASE)
    if not match:
        return None
    experts = int(match.group(1) or 1)
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[match.group(3).upper()]
    return int(experts * float(match.group(2)) * scale)


# ------------------------------------------------------------------ classification
def classify_gguf(header: GGUFHeader, filename: str, *, split: bool = False) -> Skip | None:
    """Why a GGUF file is not a servable language model, or ``None`` when it is one."""
    arch = (header.architecture or "").lower()
    kind = (header.model_type or "model").lower()
    low = filename.lower()
    if kind == "adapter":
        adapter = header.metadata.get("adapter.type")
        label = "LoRA adapter" if adapter in (None, "lora") else f"{adapter} adapter"
        return Skip(f"{label} (general.type adapter): load it with its base model", ADAPTER)
    if kind == "mmproj" or arch == "clip" or "mmproj" in low:
        return Skip(f"vision projector ({'mmproj' if kind == 'mmproj' or 'mmproj' in low else arch}): "
                    "a companion file of a multimodal model, not a model by itself", PROJECTOR)
    if arch in SPEECH_ARCHS or "whisper" in arch:
        return Skip(f"speech model ({arch}), not a language model", SPEECH)
    if arch in DIFFUSION_ARCHS:
        return Skip(f"image diffusion model ({arch}), not a language model", DIFFUSION)
    if kind != "model":
        return Skip(f"not a language model (general.type {kind!r})", NOT_A_MODEL)
    if not arch:
        return Skip("not a model (no general.architecture in the header)", NOT_A_MODEL)
    if header.tensor_count == 0 and not split:
        return Skip("vocabulary only (no tensors)", NOT_A_MODEL)
    return None


def gguf_kind(header: GGUFHeader) -> str:
    """What a servable GGUF model is for: ``rerank`` (rank pooling, or a classifier head's
    labels), ``embedding`` (an encoder architecture, or a pooling type in the header: Qwen3
    embedding models are decoders with last-token pooling), else ``chat``."""
    arch = (header.architecture or "").lower()
    pooling = header.metadata.get(f"{arch}.pooling_type")
    if pooling == POOLING_RANK or f"{arch}.classifier.output_labels" in header.metadata:
        return RERANK
    if arch in EMBEDDING_ARCHS or arch.endswith("bert") or pooling in (POOLING_MEAN, POOLING_CLS, POOLING_LAST):
        return EMBEDDING_KIND
    return CHAT


def _read(path: Path, st: os.stat_result) -> GGUFHeader | Skip:
    try:
        return read_gguf_header(path)
    except GGUFError as exc:
        return _gguf_error_skip(exc, st.st_size, path.name)


def _gguf_error_skip(exc: GGUFError, size: int, name: str) -> Skip:
    reason = str(exc)
    if size == 0:
        return Skip("empty file (0 bytes; incomplete download?)", CORRUPT)
    if reason.startswith("not a GGUF file"):
        return Skip(f"named .gguf but {reason}" if name.lower().endswith(".gguf") else reason, NOT_GGUF)
    return Skip(f"corrupt GGUF header: {reason}", CORRUPT)


def _gguf_facts(path: Path, header: GGUFHeader, size: int, created: int, parts: tuple[str, ...]) -> ModelFacts:
    extra: dict[str, Any] = {"has_chat_template": header.has_chat_template, "real_path": os.path.realpath(path)}
    if header.name:
        extra["title"] = header.name
    kind = gguf_kind(header)
    if kind != CHAT:
        extra["pooling_type"] = header.metadata.get(f"{(header.architecture or '').lower()}.pooling_type")
        dims = header.metadata.get(MATRYOSHKA_KEY)
        if isinstance(dims, list) and dims and all(isinstance(d, int) and d > 0 for d in dims):
            extra["matryoshka_dimensions"] = sorted(set(dims), reverse=True)
    if parts:
        extra["parts"] = parts
    return ModelFacts(
        path=str(path),
        format="gguf",
        size_bytes=size,
        created=created,
        context_length=header.context_length,
        architecture=header.architecture,
        quantization=header.file_type_label,
        parameters=header.parameter_count or parse_size_label(header.size_label),
        extra=extra,
        kind=kind,
    )
