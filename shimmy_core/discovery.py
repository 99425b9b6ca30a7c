"""What a model file or folder is, read from headers only: the helpers every
discovery source shares.

A :class:`Scanner` walks a folder (bounded depth, hidden folders skipped,
symlink loops cut) and turns each thing that looks like a model into a
:class:`Found`: either :class:`ModelFacts` (servable: format, architecture,
parameters, quantization, context, size) or a :class:`Skip` (why not, with a
category such as ``adapter`` or ``incomplete``).  It never reads tensor data
and never imports an inference library.  Header reads are cached by
``(path, size, mtime, inode)`` so a rescan of an unchanged tree costs a
directory walk and a ``stat`` per model file.

Sources (``plugins/sources/local_files.py``, ``ollama.py``, ``huggingface.py``,
``lmstudio.py``) only decide where to look and what to call things;
:func:`repo_names` names the models of one repository the same way everywhere.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from shimmy_core.gguf_header import GGUFError, GGUFHeader, read_gguf_header
from shimmy_core.contract.model_info import DiscoveryResult, ModelInfo, SkippedFile
from shimmy_core.safetensors_header import SafeTensorsError, SafeTensorsHeader, read_safetensors_header

MAX_DEPTH = 6
MAX_ENTRIES = 200_000           # directory entries one walk looks at before it gives up
MAX_JSON_BYTES = 16 * 1024 * 1024

# ------------------------------------------------------------------ skip categories
ADAPTER = "adapter"
PROJECTOR = "projector"
SPEECH = "speech"
DIFFUSION = "diffusion"
EMBEDDING = "embedding"
VISION = "vision"
INCOMPLETE = "incomplete"
NOT_GGUF = "not-gguf"
CORRUPT = "corrupt"
CUSTOM_CODE = "custom-code"
UNSUPPORTED = "unsupported-format"
NOT_A_MODEL = "not-a-model"
MISSING = "missing"
UNREADABLE = "unreadable"

INCOMPLETE_SUFFIXES = (".partial", ".incomplete", ".part", ".download", ".crdownload")
SPLIT_RE = re.compile(r"^(?P<base>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_PICKLE = "PyTorch pickle weights are never loaded (unpickling can run code); use a GGUF or SafeTensors version"
UNSUPPORTED_EXTENSIONS = {
    ".pt": _PICKLE,
    ".pth": _PICKLE,
    ".ckpt": _PICKLE,
    ".onnx": "ONNX models are not supported",
    ".ggml": "old GGML format: convert it to GGUF",
    ".ggmlv3": "old GGML format: convert it to GGUF",
}

SPEECH_ARCHS = {"whisper", "wav2vec2", "hubert", "wavtokenizer-dec", "encodec", "parakeet"}
DIFFUSION_ARCHS = {
    "flux", "sd1", "sd2", "sdxl", "sd3", "stable-diffusion", "unet", "vae", "aura", "ltxv",
    "hyvid", "wan", "hidream", "cosmos", "lumina2", "chroma", "qwen_image",
}
EMBEDDING_ARCHS = {
    "bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert", "neo-bert",
    "roberta", "xlm-roberta", "t5encoder", "gemma-embedding",
}
EMBEDDING_MODEL_TYPES = {
    "bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "mpnet",
    "nomic_bert", "modernbert", "camembert", "albert",
}
VISION_MODEL_TYPES = {"clip", "clip_vision_model", "siglip", "siglip_vision_model", "vit", "dinov2"}
SEQ2SEQ_MODEL_TYPES = {"t5", "mt5", "umt5", "bart", "mbart", "pegasus", "marian", "m2m_100", "nllb-moe", "longt5"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tiktoken.model")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx", "max_sequence_length")
LM_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def config_context_length(config: dict) -> int | None:
    """The trained context of a Hugging Face ``config.json`` (or its ``text_config``), under
    whichever of the usual keys the architecture uses."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return next((_int_or_none(c.get(k)) for c in (config, text) for k in CONTEXT_KEYS if _int_or_none(c.get(k))), None)


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class Skip:
    """Why something will not be served."""

    reason: str
    category: str

    def skipped(self, path: str | Path, source: str, name: str = "") -> SkippedFile:
        return SkippedFile(str(path), self.reason, source, category=self.category, name=name)


@dataclass(frozen=True)
class ModelFacts:
    """A servable model, described from its headers; :meth:`info` names it."""

    path: str
    format: str
    size_bytes: int
    created: int
    context_length: int | None = None
    architecture: str | None = None
    quantization: str | None = None
    parameters: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def info(self, model_id: str, source: str, *, aliases: Iterable[str] = (), owned_by: str = "local",
             extra: Mapping[str, Any] | None = None) -> ModelInfo:
        names = tuple(dict.fromkeys(a for a in aliases if a and a != model_id))
        return ModelInfo(
            id=model_id, path=self.path, format=self.format, source=source, created=self.created,
            owned_by=owned_by, size_bytes=self.size_bytes, context_length=self.context_length,
            architecture=self.architecture, quantization=self.quantization, parameters=self.parameters,
            aliases=names, extra={**self.extra, **(extra or {})},
        )


@dataclass(frozen=True)
class Found:
    """One model file, split set or model folder seen by a scan."""

    path: Path                 # the file (first part of a split set) or the folder
    rel: str                   # path relative to the scanned root ("" for the root itself)
    stem: str                  # the name users know: file name without .gguf or split suffix; folder name
    result: ModelFacts | Skip
    names: tuple[str, ...] = ()  # file names a request may also use

    def add_to(self, result: DiscoveryResult, source: str, model_id: str = "", *, aliases: Iterable[str] = (),
               owned_by: str = "local", extra: Mapping[str, Any] | None = None) -> None:
        """Append this find to ``result``: a model named ``model_id`` or a skipped file."""
        if isinstance(self.result, ModelFacts):
            result.models.append(self.result.info(model_id or self.stem, source,
                                                  aliases=(*aliases, *self.names), owned_by=owned_by, extra=extra))
        else:
            result.skipped.append(self.result.skipped(self.path, source, name=model_id))


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
    if arch in EMBEDDING_ARCHS or arch.endswith("bert"):
        return Skip(f"embedding model ({arch}): an encoder, listed as an embedding model, not a chat model", EMBEDDING)
    if kind != "model":
        return Skip(f"not a language model (general.type {kind!r})", NOT_A_MODEL)
    if not arch:
        return Skip("not a model (no general.architecture in the header)", NOT_A_MODEL)
    if header.tensor_count == 0 and not split:
        return Skip("vocabulary only (no tensors)", NOT_A_MODEL)
    return None


def classify_config(config: Mapping[str, Any], names: set[str]) -> Skip | None:
    """Why a Hugging Face model folder is not a servable language model, or ``None``."""
    if "auto_map" in config:
        return Skip("needs the model's own Python code (auto_map in config.json); Shimmy never runs it",
                    CUSTOM_CODE)
    model_type = str(config.get("model_type") or "").lower()
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    joined = (model_type + " " + " ".join(archs)).lower()
    if any(word in joined for word in ("whisper", "speech", "wav2vec", "hubert", "audio")):
        return Skip(f"speech model ({model_type or archs[0]}), not a language model", SPEECH)
    if "_class_name" in config or "diffusion" in joined:
        return Skip(f"image diffusion model ({config.get('_class_name') or model_type})", DIFFUSION)
    if model_type in EMBEDDING_MODEL_TYPES or "modules.json" in names or "sentence_bert_config.json" in names:
        return Skip(f"embedding model ({model_type or 'sentence-transformers'}): an encoder, "
                    "listed as an embedding model, not a chat model", EMBEDDING)
    if model_type in VISION_MODEL_TYPES:
        return Skip(f"vision encoder ({model_type}), not a language model", VISION)
    if model_type in SEQ2SEQ_MODEL_TYPES:
        return Skip(f"encoder-decoder model ({model_type}), not a chat model", NOT_A_MODEL)
    if not archs:
        return Skip("config.json names no architectures", NOT_A_MODEL)
    if not any(a.endswith(LM_HEADS) for a in archs):
        return Skip(f"not a language model (architectures {', '.join(archs)})", NOT_A_MODEL)
    return None


def classify_loose_safetensors(path: Path, header: SafeTensorsHeader | None) -> Skip:
    """A ``.safetensors`` file outside a model folder: say what it most likely is."""
    low = path.name.lower()
    names = header.tensor_names if header else ()
    if "lora" in low or any("lora_" in n or ".lora." in n for n in names[:2000]):
        return Skip("LoRA adapter (SafeTensors): load it with its base model", ADAPTER)
    diffusion_prefixes = ("model.diffusion_model.", "first_stage_model.", "double_blocks.", "single_blocks.",
                          "down_blocks.", "up_blocks.", "decoder.up", "encoder.down", "conditioner.")
    if any(w in low for w in ("vae", "unet", "flux", "sdxl", "sd_xl", "stable-diffusion", "stable_diffusion")) or \
            any(n.startswith(diffusion_prefixes) for n in names[:2000]):
        return Skip("image diffusion model (SafeTensors checkpoint), not a language model", DIFFUSION)
    if "mmproj" in low or "clip" in low or any(n.startswith(("vision_model.", "visual.")) for n in names[:50]):
        return Skip("vision encoder or projector (SafeTensors), not a language model", VISION)
    if "whisper" in low:
        return Skip("speech model (whisper), not a language model", SPEECH)
    return Skip("SafeTensors weights without config.json next to them (not a model folder)", NOT_A_MODEL)


def _gguf_error_skip(exc: GGUFError, size: int, name: str) -> Skip:
    reason = str(exc)
    if size == 0:
        return Skip("empty file (0 bytes; incomplete download?)", CORRUPT)
    if reason.startswith("not a GGUF file"):
        return Skip(f"named .gguf but {reason}" if name.lower().endswith(".gguf") else reason, NOT_GGUF)
    return Skip(f"corrupt GGUF header: {reason}", CORRUPT)


def _oserror_skip(exc: OSError) -> Skip:
    return Skip(f"unreadable: {exc.strerror or exc}", UNREADABLE)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def parse_size_label(label: str | None) -> int | None:
    """``'135M'`` -> 135_000_000; ``'8x7B'`` -> 56_000_000_000; anything else -> ``None``."""
    match = re.fullmatch(r"(?:(\d+)x)?(\d+(?:\.\d+)?)([KMBT])", (label or "").strip(), re.IGNORECASE)
    if not match:
        return None
    experts = int(match.group(1) or 1)
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[match.group(3).upper()]
    return int(experts * float(match.group(2)) * scale)


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """A small JSON file, or ``ValueError`` with a reason (too big, not JSON)."""
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"{path.name} is larger than {limit} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{path.name} is not valid JSON ({type(exc).__name__})") from None


# ------------------------------------------------------------------ the scanner
def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


class Scanner:
    """Reads model headers (cached) and walks folders.  One per source; not shared between threads
    except through :class:`shimmy_core.catalog.ModelCatalog`, which refreshes one source at a time."""

    def __init__(self, max_depth: int = MAX_DEPTH, max_entries: int = MAX_ENTRIES):
        self.max_depth = max_depth
        self.max_entries = max_entries
        self._cache: dict[tuple, tuple[tuple, Any]] = {}
        self._previous: dict[tuple, tuple[tuple, Any]] = {}
        self.header_reads = 0   # headers actually read (not served from the cache), for tests and benchmarks

    # ---------------------------------------------------------------- cache
    def start_pass(self) -> None:
        """Begin a rescan: entries not used again by the end of this pass are forgotten."""
        self._previous, self._cache = self._cache, {}

    def cached(self, kind: str, path: Path, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()`` for ``path`` unless ``key`` (a stat key) is unchanged since the last time."""
        slot = (kind, str(path))
        hit = self._cache.get(slot) or self._previous.get(slot)
        if hit is not None and hit[0] == key:
            self._cache[slot] = hit
            return hit[1]
        value = compute()
        self._cache[slot] = (key, value)
        return value

    def _header(self, path: Path, st: os.stat_result) -> GGUFHeader | Skip:
        def read() -> GGUFHeader | Skip:
            self.header_reads += 1
            try:
                return read_gguf_header(path)
            except GGUFError as exc:
                return _gguf_error_skip(exc, st.st_size, path.name)
            except OSError as exc:
                return _oserror_skip(exc)

        return self.cached("gguf", path, _stat_key(st), read)

    def _st_header(self, path: Path, st: os.stat_result) -> SafeTensorsHeader | Skip:
        def read() -> SafeTensorsHeader | Skip:
            self.header_reads += 1
            try:
                return read_safetensors_header(path)
            except SafeTensorsError as exc:
                return Skip(f"corrupt SafeTensors file {path.name}: {exc}", CORRUPT)
            except OSError as exc:
                return _oserror_skip(exc)

        return self.cached("safetensors", path, _stat_key(st), read)

    # ---------------------------------------------------------------- GGUF
    def gguf(self, path: Path, st: os.stat_result | None = None) -> ModelFacts | Skip:
        """Describe one GGUF file (not part of a split set)."""
        try:
            st = st or os.stat(path)
        except OSError as exc:
            return _missing_skip(path, exc)
        def describe() -> ModelFacts | Skip:
            header = self._header(path, st)
            if isinstance(header, Skip):
                return header
            skip = classify_gguf(header, path.name)
            return skip or _gguf_facts(path, header, st.st_size, int(st.st_mtime), parts=())

        return self.cached("gguf-model", path, _stat_key(st), describe)

    def gguf_split(self, parts: dict[int, Path], count: int) -> ModelFacts | Skip:
        """Describe a split GGUF set (``-00001-of-00003.gguf``...) as one model loaded from part 1."""
        missing = [n for n in range(1, count + 1) if n not in parts]
        if missing:
            shown = ", ".join(str(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
            return Skip(f"incomplete split model: part(s) {shown} of {count} missing", INCOMPLETE)
        first = parts[1]
        headers: list[GGUFHeader] = []
        size = created = 0
        for number in range(1, count + 1):
            path = parts[number]
            try:
                st = os.stat(path)
            except OSError as exc:
                return _missing_skip(path, exc)
            header = self._header(path, st)
            if isinstance(header, Skip):
                return Skip(f"split part {number} of {count}: {header.reason}", header.category)
            headers.append(header)
            size += st.st_size
            created = max(created, int(st.st_mtime))
        skip = classify_gguf(headers[0], first.name, split=True)
        if skip:
            return skip
        facts = _gguf_facts(first, headers[0], size, created, parts=tuple(str(parts[n]) for n in sorted(parts)))
        counts = [h.parameter_count for h in headers if h.parameter_count]
        if counts:
            facts = _replace(facts, parameters=sum(counts))
        return facts

    # ---------------------------------------------------------------- SafeTensors folders
    def folder(self, directory: Path, names: set[str]) -> ModelFacts | Skip:
        """Describe a Hugging Face style model folder (``config.json`` + weights + tokenizer)."""
        if "adapter_config.json" in names and "config.json" not in names:
            return Skip("LoRA adapter folder (adapter_config.json): load it with its base model", ADAPTER)
        if "model_index.json" in names:
            return Skip("image diffusion pipeline (diffusers model_index.json), not a language model", DIFFUSION)
        try:
            st = os.stat(directory / "config.json")
            config = self.cached("json", directory / "config.json", _stat_key(st),
                                 lambda: _json_or_skip(directory / "config.json"))
        except OSError as exc:
            return _oserror_skip(exc)
        if isinstance(config, Skip):
            return config
        if not isinstance(config, dict):
            return Skip("config.json is not a JSON object", CORRUPT)
        skip = classify_config(config, names)
        if skip:
            return skip
        shards = self._shards(directory, names)
        if isinstance(shards, Skip):
            return shards
        if not any(t in names for t in TOKENIZER_FILES):
            return Skip("no tokenizer files (tokenizer.json, tokenizer.model...) next to the weights", INCOMPLETE)
        return self._folder_facts(directory, config, shards)

    def _shards(self, directory: Path, names: set[str]) -> list[Path] | Skip:
        index_name = "model.safetensors.index.json"
        if index_name in names:
            try:
                index = read_json(directory / index_name)
            except (OSError, ValueError) as exc:
                return Skip(f"unreadable {index_name}: {exc}", CORRUPT)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                return Skip(f"{index_name} has no weight_map", CORRUPT)
            files = sorted({f for f in weight_map.values() if isinstance(f, str)})
            bad = [f for f in files if "/" in f or "\\" in f or f.startswith(".")]
            if bad:
                return Skip(f"{index_name} names a file outside the folder ({bad[0]!r})", CORRUPT)
            missing = [f for f in files if f not in names]
            if missing:
                return Skip(f"incomplete download: {len(missing)} of {len(files)} weight shards missing "
                            f"({missing[0]}{', ...' if len(missing) > 1 else ''})", INCOMPLETE)
            return [directory / f for f in files]
        shards = sorted(n for n in names if n.endswith(".safetensors"))
        if not shards:
            if any(n.startswith("pytorch_model") and n.endswith(".bin") for n in names):
                return Skip(f"pytorch_model.bin only: {_PICKLE}", UNSUPPORTED)
            return Skip("config.json without weights (no .safetensors files)", INCOMPLETE)
        return [directory / n for n in shards]

    def _folder_facts(self, directory: Path, config: dict, shards: list[Path]) -> ModelFacts | Skip:
        dtypes: dict[str, int] = {}
        params = size = 0
        created = 0
        for shard in shards:
            try:
                st = os.stat(shard)
            except OSError as exc:
                return _missing_skip(shard, exc)
            header = self._st_header(shard, st)
            if isinstance(header, Skip):
                return header
            params += header.parameter_count
            for dtype, n in header.dtypes.items():
                dtypes[dtype] = dtypes.get(dtype, 0) + n
            size += st.st_size
            created = max(created, int(st.st_mtime))
        context = config_context_length(config)
        archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
        return ModelFacts(
            path=str(directory),
            format="safetensors",
            size_bytes=size,
            created=created,
            context_length=context,
            architecture=str(config.get("model_type") or (archs[0] if archs else "")) or None,
            quantization=_safetensors_quant(config, dtypes),
            parameters=params or None,
            extra={"architectures": archs, "dtypes": dtypes, "shards": len(shards),
                   "real_path": os.path.realpath(directory)},
        )

    def loose_safetensors(self, path: Path, st: os.stat_result | None = None) -> Skip:
        try:
            st = st or os.stat(path)
        except OSError as exc:
            return _missing_skip(path, exc)
        header = self._st_header(path, st)
        if isinstance(header, Skip):
            return header
        return classify_loose_safetensors(path, header)

    # ---------------------------------------------------------------- one path
    def path(self, path: Path) -> list[Found]:
        """A file or folder someone named (``--model``, ``shimmy add``): one model, or a folder walk."""
        if path.is_dir():
            return self.walk(path)
        name = path.name
        low = name.lower()
        if not path.exists():
            return [Found(path, "", gguf_stem(name), Skip("no such file or folder", MISSING))]
        if low.endswith(INCOMPLETE_SUFFIXES):
            return [Found(path, "", name, _incomplete_skip())]
        match = SPLIT_RE.match(name)
        if match:
            base, count = match.group("base"), int(match.group("count"))
            found = self._split_set(path.parent, base, count, "", _split_parts(path.parent, base, count))
            if int(match.group("no")) != 1:
                found = Found(path, "", found.stem, Skip(
                    f"part {int(match.group('no'))} of a split model: name the first part "
                    f"({found.path.name})", NOT_A_MODEL))
            return [found]
        if low.endswith(".safetensors"):
            return [Found(path, "", name, self.loose_safetensors(path))]
        return [Found(path, "", gguf_stem(name), self.gguf(path), file_names(path))]

    def _split_set(self, directory: Path, base: str, count: int, rel: str, parts: dict[int, Path]) -> Found:
        first = parts.get(1) or directory / f"{base}-00001-of-{count:05d}.gguf"
        return Found(first, _join(rel, first.name), base, self.gguf_split(parts, count), file_names(first) + (base,))

    # ---------------------------------------------------------------- walking
    def walk(self, root: Path) -> list[Found]:
        """Everything model-like under ``root``, in a stable (sorted) order."""
        out: list[Found] = []
        state = _WalkState(self.max_entries)
        self._walk(root, "", 0, state, out)
        if state.exhausted:
            out.append(Found(root, "", root.name, Skip(
                f"scan stopped after {self.max_entries} entries (folder too large; point Shimmy at "
                "the folder that holds the models)", UNSUPPORTED)))
        return out

    def _walk(self, directory: Path, rel: str, depth: int, state: "_WalkState", out: list[Found]) -> None:
        try:
            st = os.stat(directory)
            if (st.st_dev, st.st_ino) in state.visited:
                return  # a symlink loop, or a folder already seen through another link
            state.visited.add((st.st_dev, st.st_ino))
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if depth == 0 and not isinstance(exc, FileNotFoundError):
                out.append(Found(directory, rel, directory.name, _oserror_skip(exc)))
            return
        state.budget -= len(entries)
        if state.budget < 0:
            state.exhausted = True
            return
        files: list[os.DirEntry] = []
        subdirs: list[os.DirEntry] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                (subdirs if entry.is_dir() else files).append(entry)
            except OSError:
                files.append(entry)
        names = {e.name for e in files}
        diffusers = self._files(directory, rel, files, names, out)
        if depth < self.max_depth and not diffusers:
            for entry in subdirs:
                self._walk(Path(entry.path), _join(rel, entry.name), depth + 1, state, out)

    def _files(self, directory: Path, rel: str, files: list[os.DirEntry], names: set[str],
               out: list[Found]) -> bool:
        """Classify the files of one folder; True when the folder is a diffusers pipeline (not descended)."""
        is_folder_model = "config.json" in names and (
            any(n.endswith(".safetensors") for n in names) or "model.safetensors.index.json" in names
            or any(n.startswith("pytorch_model") and n.endswith(".bin") for n in names))
        is_folder_model = is_folder_model or "adapter_config.json" in names or "model_index.json" in names
        if is_folder_model:
            out.append(Found(directory, rel, directory.name, self.folder(directory, names)))
        splits: dict[tuple[str, int], dict[int, Path]] = {}
        for entry in files:
            name = entry.name
            low = name.lower()
            ext = os.path.splitext(low)[1]
            if ext == ".gguf":
                match = SPLIT_RE.match(name)
                if match:
                    key = (match.group("base"), int(match.group("count")))
                    splits.setdefault(key, {})[int(match.group("no"))] = Path(entry.path)
                    continue
                path = Path(entry.path)
                try:
                    result: ModelFacts | Skip = self.gguf(path, entry.stat())
                except OSError as exc:
                    result = _missing_skip(path, exc)
                out.append(Found(path, _join(rel, name), gguf_stem(name), result, file_names(path)))
            elif low.endswith(INCOMPLETE_SUFFIXES):
                out.append(Found(Path(entry.path), _join(rel, name), name, _incomplete_skip()))
            elif ext == ".safetensors" and not is_folder_model:
                path = Path(entry.path)
                try:
                    skip = self.loose_safetensors(path, entry.stat())
                except OSError as exc:
                    skip = _missing_skip(path, exc)
                out.append(Found(path, _join(rel, name), name, skip))
            elif ext in UNSUPPORTED_EXTENSIONS:
                skip = Skip(UNSUPPORTED_EXTENSIONS[ext], UNSUPPORTED)
                out.append(Found(Path(entry.path), _join(rel, name), name, skip))
        for (base, count), parts in splits.items():
            out.append(self._split_set(directory, base, count, rel, parts))
        return "model_index.json" in names


@dataclass
class _WalkState:
    budget: int
    visited: set[tuple[int, int]] = field(default_factory=set)
    exhausted: bool = False


def _split_parts(directory: Path, base: str, count: int) -> dict[int, Path]:
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


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _replace(facts: ModelFacts, **changes: Any) -> ModelFacts:
    from dataclasses import replace

    return replace(facts, **changes)


def _incomplete_skip() -> Skip:
    return Skip("incomplete download (partial file)", INCOMPLETE)


def _missing_skip(path: Path, exc: OSError) -> Skip:
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(path):
            return Skip("broken link: its target is missing (incomplete download?)", INCOMPLETE)
        return Skip("no such file", MISSING)
    return _oserror_skip(exc)


def _json_or_skip(path: Path) -> Any:
    try:
        return read_json(path)
    except ValueError as exc:
        return Skip(f"corrupt {path.name}: {exc}", CORRUPT)
    except OSError as exc:
        return _oserror_skip(exc)


def _gguf_facts(path: Path, header: GGUFHeader, size: int, created: int, parts: tuple[str, ...]) -> ModelFacts:
    extra: dict[str, Any] = {"has_chat_template": header.has_chat_template, "real_path": os.path.realpath(path)}
    if header.name:
        extra["title"] = header.name
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
    )


def _safetensors_quant(config: Mapping[str, Any], dtypes: Mapping[str, int]) -> str | None:
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method"):
        label = str(quant["quant_method"]).upper()
        bits = quant.get("bits") or (4 if quant.get("load_in_4bit") else 8 if quant.get("load_in_8bit") else None)
        return f"{label} {bits}-bit" if isinstance(bits, int) else label
    mlx = config.get("quantization")
    if isinstance(mlx, dict) and isinstance(mlx.get("bits"), int):
        return f"MLX {mlx['bits']}-bit"
    return max(dtypes, key=dtypes.__getitem__) if dtypes else None


# ------------------------------------------------------------------ naming helpers
def repo_names(base: str, found: list[Found], root: str = "") -> dict[int, tuple[str, tuple[str, ...]]]:
    """Names for the models of one repository (a Hugging Face repo, an LM Studio folder...).

    One model: ``base`` (and ``base:stem`` as an alias, so the name survives a second
    download).  Several: ``base:stem`` each (``base:sub/stem`` where stems collide), plus
    ``base:QUANT`` as an alias when that quantization is unique in the repo.  A SafeTensors
    folder at the repository's root (``root``, relative to the scan) is labelled
    ``safetensors``.  Returns ``{index in found: (id, aliases)}`` for the servable entries.
    """
    models = [(i, f, f.result) for i, f in enumerate(found) if isinstance(f.result, ModelFacts)]
    labels = [_label(f, facts, root, nested=False) for _, f, facts in models]
    quants = [facts.quantization for _, _, facts in models]
    names: dict[int, tuple[str, tuple[str, ...]]] = {}
    for (i, f, facts), label, quant in zip(models, labels, quants):
        if labels.count(label) > 1:
            label = _label(f, facts, root, nested=True)
        alias = (f"{base}:{quant}",) if quant and quants.count(quant) == 1 and quant != label else ()
        if len(models) == 1:
            names[i] = (base, (f"{base}:{label}", *alias))
        else:
            names[i] = (f"{base}:{label}", alias)
    return names


def _label(found: Found, facts: ModelFacts, root: str, *, nested: bool) -> str:
    rel = found.rel
    if root and (rel == root or rel.startswith(root + "/")):
        rel = rel[len(root):].lstrip("/")
    if facts.format != "gguf":
        return rel or facts.format
    if not nested or "/" not in rel:
        return found.stem
    return _join(rel.rsplit("/", 1)[0], found.stem)


def add_all(result: DiscoveryResult, found: Iterable[Found], source: str, owned_by: str = "local") -> None:
    """Add finds named after their files (``model.Q4_K_M.gguf`` -> ``model.Q4_K_M``)."""
    for item in found:
        item.add_to(result, source, owned_by=owned_by)


def add_named(result: DiscoveryResult, found: list[Found], base: str, source: str, *,
              owned_by: str = "local", root: str = "") -> None:
    """Add the finds of one repository-like folder, named with :func:`repo_names`."""
    names = repo_names(base, found, root)
    for index, item in enumerate(found):
        model_id, aliases = names.get(index, (base, ()))
        item.add_to(result, source, model_id, aliases=aliases, owned_by=owned_by)
