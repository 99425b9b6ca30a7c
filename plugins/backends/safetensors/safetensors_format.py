"""The SafeTensors model format, as discovery sees it: a Hugging Face model folder
(``config.json``, ``*.safetensors`` weights with their index when sharded, tokenizer files)
described from ``config.json`` and the weights' JSON headers only
(:mod:`shimmy_plugins.backends.safetensors.safetensors_header`).

A folder that is not a servable language model (an adapter, a diffusers pipeline, a
speech or vision model, one that needs its own Python code, pickle weights
only) is skipped with its reason; encoders and sentence-transformers folders are listed as
``embedding`` models (their pooling read from ``modules.json``, :func:`read_sentence_transformers`)
and cross-encoders (``*ForSequenceClassification`` with one label) as ``rerank`` models; a ``.safetensors`` file outside a model folder is
skipped with a guess at what it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass, replace
from typing import AbstractSet, Any, Iterable, Mapping, Sequence

from shimmy_core.plugin_api import ADAPTER, CORRUPT, DIFFUSION, EMBEDDING, INCOMPLETE, NOT_A_MODEL, SPEECH, VISION
from shimmy_core.plugin_api import CHAT, EMBEDDING_KIND, RERANK
from shimmy_core.plugin_api import HeaderCache, ModelFacts, oserror_skip, PICKLE_REFUSAL, read_json, Recognized
from shimmy_core.plugin_api import Skip, stat_key, UNSUPPORTED
from shimmy_plugins.backends.safetensors.safetensors_header import (
    SafeTensorsError,
    SafeTensorsHeader,
    read_safetensors_header,
)

CUSTOM_CODE = "custom-code"   # skip category: the model needs its own Python code
INDEX_FILE = "model.safetensors.index.json"
EMBEDDING_MODEL_TYPES = {
    "bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "mpnet",
    "nomic_bert", "modernbert", "camembert", "albert",
}
VISION_MODEL_TYPES = {"clip", "clip_vision_model", "siglip", "siglip_vision_model", "vit", "dinov2"}
SEQ2SEQ_MODEL_TYPES = {"t5", "mt5", "umt5", "bart", "mbart", "pegasus", "marian", "m2m_100", "nllb-moe", "longt5"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tiktoken.model")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx", "max_sequence_length")
LM_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
ST_MODULES = "sentence_transformers.models."
POOLING_MODES = {  # sentence-transformers' 1_Pooling/config.json flags -> the pooling Shimmy runs
    "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}


class SafeTensorsFormat:
    """Hugging Face model folders; loose ``.safetensors`` files are named and skipped."""

    name = "safetensors"
    suffixes = (".safetensors",)

    def inspect_folder(self, folder: Path, names: AbstractSet[str], headers: HeaderCache) -> Recognized | None:
        if not is_model_folder(names):
            return None
        # A diffusers pipeline's subfolders are its parts (unet, vae, text encoder), not models.
        return Recognized(folder, self.describe_folder(folder, names, headers), folder.name,
                          leaf="model_index.json" in names)

    def inspect_files(self, folder: Path, files: Sequence[Path], headers: HeaderCache) -> Iterable[Recognized]:
        return [Recognized(path, self.loose(path, headers), path.name) for path in files]

    def inspect_path(self, path: Path, headers: HeaderCache) -> Recognized | None:
        if not path.name.lower().endswith(".safetensors"):
            return None
        return Recognized(path, self.loose(path, headers), path.name)

    # ---------------------------------------------------------------- model folders
    def describe_folder(self, directory: Path, names: AbstractSet[str], headers: HeaderCache) -> ModelFacts | Skip:
        """Describe a Hugging Face style model folder (``config.json`` + weights + tokenizer)."""
        if "adapter_config.json" in names and "config.json" not in names:
            return Skip("LoRA adapter folder (adapter_config.json): load it with its base model", ADAPTER)
        if "model_index.json" in names:
            return Skip("image diffusion pipeline (diffusers model_index.json), not a language model", DIFFUSION)
        try:
            st = os.stat(directory / "config.json")
            config = headers.cached("json", directory / "config.json", stat_key(st),
                                    lambda: _json_or_skip(directory / "config.json"))
        except OSError as exc:
            return oserror_skip(exc)
        if isinstance(config, Skip):
            return config
        if not isinstance(config, dict):
            return Skip("config.json is not a JSON object", CORRUPT)
        skip = classify_config(config, names)
        if skip:
            return skip
        shards = _shards(directory, names)
        if isinstance(shards, Skip):
            return shards
        if not any(t in names for t in TOKENIZER_FILES):
            return Skip("no tokenizer files (tokenizer.json, tokenizer.model...) next to the weights", INCOMPLETE)
        kind = config_kind(config, names)
        if kind == EMBEDDING_KIND:
            st = _cached_sentence_transformers(directory, names, headers)
            if isinstance(st, Skip):
                return st
            facts = _folder_facts(directory, config, shards, headers)
            if isinstance(facts, ModelFacts):
                extra = {**facts.extra, "pooling": st.pooling, "normalize": st.normalize}
                if st.matryoshka_dimensions:
                    extra["matryoshka_dimensions"] = list(st.matryoshka_dimensions)
                facts = replace(facts, kind=kind, extra=extra,
                                context_length=min(filter(None, (st.max_seq_length, facts.context_length)), default=None))
            return facts
        facts = _folder_facts(directory, config, shards, headers)
        return replace(facts, kind=kind) if isinstance(facts, ModelFacts) else facts

    def loose(self, path: Path, headers: HeaderCache) -> Skip:
        """A ``.safetensors`` file outside a model folder: say what it most likely is."""
        read = headers.read_header("safetensors", path, _read)
        return read if isinstance(read, Skip) else classify_loose_safetensors(path, read[1])


def is_model_folder(names: AbstractSet[str]) -> bool:
    """Whether a folder holding the files ``names`` is a model folder (servable or not)."""
    weights = "config.json" in names and (
        any(n.endswith(".safetensors") for n in names) or INDEX_FILE in names
        or any(n.startswith("pytorch_model") and n.endswith(".bin") for n in names))
    return weights or "adapter_config.json" in names or "model_index.json" in names


def config_context_length(config: dict) -> int | None:
    """The trained context of a Hugging Face ``config.json`` (or its ``text_config``), under
    whichever of the usual keys the architecture uses."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return next((_int_or_none(c.get(k)) for c in (config, text) for k in CONTEXT_KEYS if _int_or_none(c.get(k))), None)


# ------------------------------------------------------------------ classification
def classify_config(config: Mapping[str, Any], names: AbstractSet[str]) -> Skip | None:
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
    kind = config_kind(config, names)
    if isinstance(kind, Skip) or kind != CHAT:
        return kind if isinstance(kind, Skip) else None
    if model_type in VISION_MODEL_TYPES:
        return Skip(f"vision encoder ({model_type}), not a language model", VISION)
    if model_type in SEQ2SEQ_MODEL_TYPES:
        return Skip(f"encoder-decoder model ({model_type}), not a chat model", NOT_A_MODEL)
    if not archs:
        return Skip("config.json names no architectures", NOT_A_MODEL)
    if not any(a.endswith(LM_HEADS) for a in archs):
        return Skip(f"not a language model (architectures {', '.join(archs)})", NOT_A_MODEL)
    return None


def config_kind(config: Mapping[str, Any], names: AbstractSet[str]) -> str | Skip:
    """What a model folder is for: ``rerank`` (a cross-encoder: ``*ForSequenceClassification``
    with one label), ``embedding`` (an encoder, or a sentence-transformers folder), else ``chat``;
    a classifier with several labels is not served."""
    model_type = str(config.get("model_type") or "").lower()
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if any(a.endswith("ForSequenceClassification") for a in archs):
        labels = config.get("id2label")
        count = len(labels) if isinstance(labels, dict) else config.get("num_labels", 2)
        if count != 1:
            return Skip(f"text classifier ({archs[0]}, {count} labels), not a reranker or a chat model", NOT_A_MODEL)
        return RERANK
    if model_type in EMBEDDING_MODEL_TYPES or "modules.json" in names or "sentence_bert_config.json" in names:
        return EMBEDDING_KIND
    return CHAT


@dataclass(frozen=True)
class SentenceTransformersConfig:
    """What a sentence-transformers folder declares (``modules.json``, ``1_Pooling/config.json``,
    ``sentence_bert_config.json``, ``config_sentence_transformers.json``); a plain encoder folder
    gets mean pooling without normalization."""

    pooling: str = "mean"                     # mean, cls, max or last
    normalize: bool = False                   # a Normalize module: unit-length vectors
    max_seq_length: int | None = None         # the longest input it was trained on
    matryoshka_dimensions: tuple[int, ...] = ()   # Shimmy's key in config_sentence_transformers.json


def read_sentence_transformers(directory: Path, names: AbstractSet[str]) -> SentenceTransformersConfig | Skip:
    """The pooling, normalization and input length a folder's sentence-transformers files declare,
    or the Skip saying which module Shimmy cannot run (a Dense layer...)."""
    if "modules.json" not in names:
        return SentenceTransformersConfig()
    try:
        modules = read_json(directory / "modules.json")
        pooling, normalize = "mean", False
        if not isinstance(modules, list):
            return Skip("modules.json is not a list of modules", CORRUPT)
        for module in modules:
            kind = str(module.get("type", "")) if isinstance(module, dict) else ""
            if kind == ST_MODULES + "Transformer" and module.get("path", "") in ("", "."):
                continue
            if kind == ST_MODULES + "Normalize":
                normalize = True
            elif kind == ST_MODULES + "Pooling":
                sub = str(module.get("path") or "")
                doc = read_json(directory / sub / "config.json") if sub and "/" not in sub and ".." not in sub else {}
                modes = [mode for flag, mode in POOLING_MODES.items() if isinstance(doc, dict) and doc.get(flag)]
                if len(modes) != 1:
                    on = [k for k, v in doc.items() if k.startswith("pooling_mode") and v] if isinstance(doc, dict) else []
                    return Skip(f"sentence-transformers pooling {', '.join(on) or 'none'} is not supported "
                                f"(Shimmy pools by one of mean, cls, max, lasttoken)", UNSUPPORTED)
                pooling = modes[0]
            else:
                return Skip(f"sentence-transformers module {kind or repr(module)} is not supported "
                            "(Shimmy runs Transformer, Pooling and Normalize)", EMBEDDING)
        bert = read_json(directory / "sentence_bert_config.json") if "sentence_bert_config.json" in names else {}
        extra = read_json(directory / "config_sentence_transformers.json") \
            if "config_sentence_transformers.json" in names else {}
    except ValueError as exc:
        return Skip(f"unreadable sentence-transformers config: {exc}", CORRUPT)
    except OSError as exc:
        return oserror_skip(exc)
    length = _int_or_none(bert.get("max_seq_length")) if isinstance(bert, dict) else None
    dims = extra.get("matryoshka_dimensions") if isinstance(extra, dict) else None
    matryoshka = tuple(sorted({d for d in dims if _int_or_none(d)}, reverse=True)) if isinstance(dims, list) else ()
    return SentenceTransformersConfig(pooling, normalize, length, matryoshka)


def _cached_sentence_transformers(directory: Path, names: AbstractSet[str],
                                  headers: HeaderCache) -> SentenceTransformersConfig | Skip:
    """:func:`read_sentence_transformers`, read again only when ``modules.json`` changes."""
    if "modules.json" not in names:
        return SentenceTransformersConfig()
    try:
        key = stat_key(os.stat(directory / "modules.json"))
    except OSError as exc:
        return oserror_skip(exc)
    return headers.cached("sentence-transformers", directory / "modules.json", key,
                          lambda: read_sentence_transformers(directory, names))


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


# ------------------------------------------------------------------ reading
def _read(path: Path, st: os.stat_result) -> SafeTensorsHeader | Skip:
    try:
        return read_safetensors_header(path)
    except SafeTensorsError as exc:
        return Skip(f"corrupt SafeTensors file {path.name}: {exc}", CORRUPT)


def _shards(directory: Path, names: AbstractSet[str]) -> list[Path] | Skip:
    if INDEX_FILE in names:
        try:
            index = read_json(directory / INDEX_FILE)
        except (OSError, ValueError) as exc:
            return Skip(f"unreadable {INDEX_FILE}: {exc}", CORRUPT)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            return Skip(f"{INDEX_FILE} has no weight_map", CORRUPT)
        files = sorted({f for f in weight_map.values() if isinstance(f, str)})
        bad = [f for f in files if "/" in f or "\\" in f or f.startswith(".")]
        if bad:
            return Skip(f"{INDEX_FILE} names a file outside the folder ({bad[0]!r})", CORRUPT)
        missing = [f for f in files if f not in names]
        if missing:
            return Skip(f"incomplete download: {len(missing)} of {len(files)} weight shards missing "
                        f"({missing[0]}{', ...' if len(missing) > 1 else ''})", INCOMPLETE)
        return [directory / f for f in files]
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    if not shards:
        if any(n.startswith("pytorch_model") and n.endswith(".bin") for n in names):
            return Skip(f"pytorch_model.bin only: {PICKLE_REFUSAL}", UNSUPPORTED)
        return Skip("config.json without weights (no .safetensors files)", INCOMPLETE)
    return [directory / n for n in shards]


def _folder_facts(directory: Path, config: dict, shards: list[Path], headers: HeaderCache) -> ModelFacts | Skip:
    dtypes: dict[str, int] = {}
    params = size = 0
    created = 0
    for shard in shards:
        read = headers.read_header("safetensors", shard, _read)
        if isinstance(read, Skip):
            return read
        st, header = read
        params += header.parameter_count
        for dtype, n in header.dtypes.items():
            dtypes[dtype] = dtypes.get(dtype, 0) + n
        size += st.st_size
        created = max(created, int(st.st_mtime))
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    return ModelFacts(
        path=str(directory),
        format="safetensors",
        size_bytes=size,
        created=created,
        context_length=config_context_length(config),
        architecture=str(config.get("model_type") or (archs[0] if archs else "")) or None,
        quantization=_quantization(config, dtypes),
        parameters=params or None,
        extra={"architectures": archs, "dtypes": dtypes, "shards": len(shards),
               "real_path": os.path.realpath(directory)},
    )


def _quantization(config: Mapping[str, Any], dtypes: Mapping[str, int]) -> str | None:
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method"):
        label = str(quant["quant_method"]).upper()
        bits = quant.get("bits") or (4 if quant.get("load_in_4bit") else 8 if quant.get("load_in_8bit") else None)
        return f"{label} {bits}-bit" if isinstance(bits, int) else label
    mlx = config.get("quantization")
    if isinstance(mlx, dict) and isinstance(mlx.get("bits"), int):
        return f"MLX {mlx['bits']}-bit"
    return max(dtypes, key=dtypes.__getitem__) if dtypes else None


def _json_or_skip(path: Path) -> Any:
    try:
        return read_json(path)
    except ValueError as exc:
        return Skip(f"corrupt {path.name}: {exc}", CORRUPT)
    except OSError as exc:
        return oserror_skip(exc)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
