"""Discovery: realistic model stores under a temporary HOME (Shimmy's own folder,
an Ollama store whose blob is the real SmolLM2 GGUF, a Hugging Face cache with a
GGUF repo and a SafeTensors repo, LM Studio's folder), GGUF files written with the
``gguf`` writer for every kind of file that must be skipped, hostile headers, split
sets, names and name clashes, caching and the ``shimmy add`` registry.

No model is loaded here; ``tests/test_discovery_cli.py`` serves and chats."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path

import pytest

from shimmy_core import discovery
from shimmy_core.discovery import repo_names
from shimmy_core.catalog import ModelCatalog
from shimmy_core.contract.model_info import DiscoveryResult, ModelInfo, SkippedFile
from shimmy_core.plugin_manager import create_plugin_manager
from shimmy_core.plugin_registry import build_registry
from shimmy_core.contract.settings import Settings
from shimmy_plugins.backends.gguf import gguf_backend
from shimmy_plugins.backends.gguf.gguf_format import GGUFFormat, parse_size_label
from shimmy_plugins.backends.safetensors import safetensors_backend
from shimmy_plugins.backends.safetensors.safetensors_format import SafeTensorsFormat
from shimmy_plugins.backends.safetensors.safetensors_header import SafeTensorsError, read_safetensors_header
from shimmy_plugins.sources import huggingface
from shimmy_plugins.sources import lmstudio
from shimmy_plugins.sources import local_files
from shimmy_plugins.sources import ollama

SOURCE_PLUGINS = [("local_files", local_files), ("ollama", ollama), ("huggingface", huggingface),
                  ("lmstudio", lmstudio)]
# The formats come from the backend plugins: discovery itself knows none.
DISCOVERY_PLUGINS = [("gguf", gguf_backend), ("safetensors", safetensors_backend), *SOURCE_PLUGINS]
FORMATS = (GGUFFormat(), SafeTensorsFormat())


def scanner(**limits) -> discovery.Scanner:
    """A scanner that knows the built-in formats."""
    return discovery.Scanner(FORMATS, **limits)
STORE_VARS = ("OLLAMA_MODELS", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME")
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ------------------------------------------------------------------ writers
def write_gguf(path: Path, arch: str = "llama", *, kind: str | None = None, name: str | None = None,
               context: int | None = 4096, file_type: int | None = 15, chat_template: bool = True,
               tensors: int = 2, kv: dict | None = None) -> Path:
    """A small, valid GGUF file written with the ``gguf`` package's writer."""
    import gguf
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    if kind:
        writer.add_type(kind)
    if name:
        writer.add_name(name)
    if context:
        writer.add_context_length(context)
    if file_type is not None:
        writer.add_file_type(file_type)
    if chat_template:
        writer.add_chat_template(TEMPLATE)
    for key, value in (kv or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    for i in range(tensors):
        writer.add_tensor(f"blk.{i}.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_split(directory: Path, base: str, count: int, parts: tuple[int, ...] | None = None) -> list[Path]:
    """A split GGUF set as ``gguf-split`` writes it (``split.*`` keys; tensors spread over the parts)."""
    written = []
    for number in parts or range(1, count + 1):
        kv = {"split.no": number - 1, "split.count": count, "split.tensors.count": 2 * count}
        first = number == 1
        written.append(write_gguf(directory / f"{base}-{number:05d}-of-{count:05d}.gguf", name="Big" if first else None,
                                  context=8192 if first else None, file_type=7 if first else None,
                                  chat_template=first, kv=kv))
    return written


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], *, truncate: int = 0) -> Path:
    """A SafeTensors file with zeroed data: ``{name: (dtype, shape)}``."""
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "I8": 1, "U8": 1}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for dim in shape:
            n *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(max(offset - truncate, 0)))
    return path


LLAMA_TENSORS = {
    "model.embed_tokens.weight": ("BF16", [64, 16]),
    "model.layers.0.self_attn.q_proj.weight": ("BF16", [16, 16]),
    "lm_head.weight": ("BF16", [64, 16]),
}


def hf_model_folder(folder: Path, config: dict, *, tensors=LLAMA_TENSORS, tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    write_safetensors(folder / "model.safetensors", tensors)
    if tokenizer:
        (folder / "tokenizer.json").write_text('{"version": "1.0"}')
        (folder / "tokenizer_config.json").write_text("{}")
    return folder


def link(src: Path, dst: Path) -> Path:
    """Hard-link ``src`` to ``dst`` (a symlink across file systems): never a 98 MB copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        os.symlink(src, dst)
    return dst


def hostile_gguf(kind: str) -> bytes:
    """Headers that must be refused quickly, without a crash or a huge allocation."""
    head = b"GGUF" + struct.pack("<I", 3)
    if kind == "count":
        return head + struct.pack("<QQ", 2**63, 0) + bytes(64)
    if kind == "keys":
        return head + struct.pack("<QQ", 0, 2**63) + bytes(64)
    if kind == "string":
        return head + struct.pack("<QQ", 0, 1) + struct.pack("<Q", 2**62) + b"general.architecture"
    if kind == "offset":
        key, value = b"general.architecture", b"llama"
        kv = struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", len(value)) + value
        # one F32 tensor "w" of 32 elements whose data would start 1 TiB into the file
        tensor = struct.pack("<Q", 1) + b"w" + struct.pack("<IQ", 1, 32) + struct.pack("<IQ", 0, 2**40)
        return head + struct.pack("<QQ", 1, 1) + kv + tensor + bytes(64)
    raise ValueError(kind)


# ------------------------------------------------------------------ stores
def ollama_blob(store: Path, data: bytes | None = None, *, source: Path | None = None,
                digest: str | None = None) -> dict:
    """Put a blob in the store and return its manifest layer (digest and size as Ollama writes them)."""
    blobs = store / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    if source is not None:
        digest = digest or sha256_file(source)
        link(source, blobs / f"sha256-{digest}")
        size = source.stat().st_size
    else:
        assert data is not None
        digest = hashlib.sha256(data).hexdigest()
        (blobs / f"sha256-{digest}").write_bytes(data)
        size = len(data)
    return {"digest": f"sha256:{digest}", "size": size}


def ollama_manifest(store: Path, name: tuple[str, str, str, str], layers: list[tuple[str, dict]]) -> Path:
    config = ollama_blob(store, json.dumps({"model_format": "gguf", "model_family": "llama",
                                            "model_families": ["llama"], "model_type": "135M",
                                            "file_type": "Q4_1", "architecture": "amd64", "os": "linux",
                                            "rootfs": {"type": "layers", "diff_ids": []}}).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
        "layers": [{"mediaType": f"application/vnd.ollama.image.{kind}", **layer} for kind, layer in layers],
    }
    path = store / "manifests" / Path(*name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


_DIGESTS: dict[Path, str] = {}


def sha256_file(path: Path) -> str:
    if path not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[path] = h.hexdigest()
    return _DIGESTS[path]


SMOLLM2_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                    "<|im_start|>assistant\n")


def build_ollama_store(store: Path, smollm2: Path) -> Path:
    """An Ollama store like ``ollama pull smollm2:135m`` leaves, plus a user model, a model from
    another registry and an unfinished pull."""
    model = ollama_blob(store, source=smollm2)
    template = ollama_blob(store, SMOLLM2_TEMPLATE.encode())
    system = ollama_blob(store, b"You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    params = ollama_blob(store, json.dumps({"stop": ["<|im_start|>", "<|im_end|>"], "temperature": 0.2}).encode())
    license_ = ollama_blob(store, b"Apache License 2.0")
    layers = [("model", model), ("template", template), ("system", system), ("license", license_), ("params", params)]
    ollama_manifest(store, ("registry.ollama.ai", "library", "smollm2", "135m"), layers)
    ollama_manifest(store, ("registry.ollama.ai", "library", "smollm2", "latest"), layers)
    tiny = ollama_blob(store, write_gguf(store.parent / "tmp-tiny.gguf", name="Tiny").read_bytes())
    ollama_manifest(store, ("registry.ollama.ai", "someone", "tiny", "latest"), [("model", tiny)])
    other = ollama_blob(store, write_gguf(store.parent / "tmp-other.gguf", file_type=15).read_bytes())
    ollama_manifest(store, ("hf.co", "acme", "Tiny-GGUF", "Q4_K_M"), [("model", other)])
    ghost = {"digest": "sha256:" + "ab" * 32, "size": 1 << 30}
    (store / "blobs" / f"sha256-{'ab' * 32}-partial").write_bytes(b"\0" * 16)
    ollama_manifest(store, ("registry.ollama.ai", "library", "ghost", "latest"), [("model", ghost)])
    bad = {"digest": "sha256:../../../../etc/passwd", "size": 1}
    ollama_manifest(store, ("registry.ollama.ai", "library", "evil", "latest"), [("model", bad)])
    return store


def hf_blob_link(repo: Path, revision: str, rel: str, data: bytes) -> Path:
    """A snapshot file as ``huggingface_hub`` stores it: a relative symlink into ``blobs/``."""
    digest = hashlib.sha256(data).hexdigest()
    blob = repo / "blobs" / digest
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    target = repo / "snapshots" / revision / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(os.path.relpath(blob, target.parent))
    return target


def build_hf_cache(hub: Path, scratch: Path) -> Path:
    """A Hugging Face hub cache with a GGUF repo (two quantizations and a projector), a
    single-file GGUF repo, a SafeTensors repo and repos to skip."""
    revision = "a" * 40
    repo = hub / "models--acme--Tiny-GGUF"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    for name, file_type in (("tiny.Q4_K_M.gguf", 15), ("tiny.Q8_0.gguf", 7)):
        hf_blob_link(repo, revision, name, write_gguf(scratch / name, name="Tiny", file_type=file_type).read_bytes())
    mmproj = write_gguf(scratch / "mmproj.gguf", "clip", kind="mmproj", context=None, chat_template=False)
    hf_blob_link(repo, revision, "mmproj-tiny-f16.gguf", mmproj.read_bytes())
    (repo / "blobs" / ("f" * 64 + ".incomplete")).write_bytes(b"\0" * 10)
    old = repo / "snapshots" / ("0" * 40)  # an older revision refs/main no longer names
    write_gguf(old / "tiny.Q2_K.gguf", file_type=10)

    solo = hub / "models--acme--Solo-GGUF"
    (solo / "refs").mkdir(parents=True)
    (solo / "refs" / "main").write_text(revision)
    hf_blob_link(solo, revision, "solo-q4_0.gguf", write_gguf(scratch / "solo.gguf", file_type=2).read_bytes())
    (solo / "snapshots" / revision / "solo-q8_0.gguf").symlink_to("../../blobs/" + "e" * 64)  # blob gone

    st_repo = hub / "models--acme--tiny-llama" / "snapshots" / revision
    (st_repo.parent.parent / "refs").mkdir(parents=True)
    (st_repo.parent.parent / "refs" / "main").write_text(revision)
    hf_model_folder(st_repo, {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                              "max_position_embeddings": 2048, "torch_dtype": "bfloat16"})
    hf_model_folder(hub / "models--acme--custom" / "snapshots" / revision,
                    {"architectures": ["CustomForCausalLM"], "model_type": "custom",
                     "auto_map": {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}})
    hf_model_folder(hub / "models--acme--bert-embed" / "snapshots" / revision,
                    {"architectures": ["BertModel"], "model_type": "bert"},
                    tensors={"embeddings.word_embeddings.weight": ("F32", [64, 16])})
    dense = hf_model_folder(hub / "models--acme--dense-embed" / "snapshots" / revision,
                            {"architectures": ["BertModel"], "model_type": "bert"},
                            tensors={"embeddings.word_embeddings.weight": ("F32", [64, 16])})
    (dense / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.models.Dense"}]))
    pickle_only = hub / "models--acme--old-pickle" / "snapshots" / revision
    pickle_only.mkdir(parents=True)
    (pickle_only / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    (pickle_only / "pytorch_model.bin").write_bytes(b"PK\x03\x04 never opened")
    (hub / "datasets--acme--data" / "snapshots").mkdir(parents=True)
    return hub


def build_shimmy_models(models: Path, scratch: Path) -> Path:
    """``~/.shimmy/models`` with one servable model and every kind of file that must be skipped."""
    write_gguf(models / "tiny-chat.Q4_K_M.gguf", name="Tiny Chat")
    write_gguf(models / "adapters" / "tiny-lora.gguf", kind="adapter", context=None, kv={"adapter.type": "lora"})
    write_gguf(models / "vision" / "mmproj-tiny-f16.gguf", "clip", kind="mmproj", context=None)
    write_gguf(models / "vision" / "clip-vit-large.gguf", "clip", context=None)
    write_gguf(models / "speech" / "whisper-base.gguf", "whisper", context=None)
    write_gguf(models / "embed" / "bge-small.gguf", "bert", context=512)
    write_gguf(models / "flux1-schnell-Q4_0.gguf", "flux", context=None, file_type=2)
    broken = models / "broken"
    broken.mkdir()
    (broken / "empty.gguf").write_bytes(b"")
    whole = write_gguf(scratch / "whole.gguf").read_bytes()
    (broken / "truncated.gguf").write_bytes(whole[: len(whole) - 200])
    (broken / "not-really.gguf").write_bytes(b"\x7fELF" + bytes(100))
    for kind in ("count", "keys", "string", "offset"):
        (broken / f"hostile-{kind}.gguf").write_bytes(hostile_gguf(kind))
    (models / "downloading").mkdir()
    (models / "downloading" / "big-model.Q8_0.gguf.part").write_bytes(bytes(1000))
    (models / "downloading" / "other.gguf.incomplete").write_bytes(bytes(10))
    write_split(models / "split", "big-model", 3)
    write_split(models / "split-missing", "half-model", 2, parts=(1,))
    (models / "old").mkdir()
    (models / "old" / "model.pth").write_bytes(b"never opened")
    (models / "README.md").write_text("my models\n")
    (models / ".hidden").mkdir()
    write_gguf(models / ".hidden" / "secret.gguf")
    os.symlink(models, models / "loop")  # a symlink loop must not hang the scan
    return models


def build_lmstudio(root: Path) -> Path:
    write_gguf(root / "lmstudio-community" / "Tiny-Chat-GGUF" / "Tiny-Chat-Q4_K_M.gguf", file_type=15)
    write_gguf(root / "lmstudio-community" / "Tiny-Chat-GGUF" / "Tiny-Chat-Q6_K.gguf", file_type=18)
    hf_model_folder(root / "mlx-community" / "Tiny-4bit",
                    {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 1024,
                     "quantization": {"group_size": 64, "bits": 4}})
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory, smollm2_path):
    """A temporary HOME holding every store; returns the paths and the environment to use."""
    home = tmp_path_factory.mktemp("world")
    scratch = home / "scratch"
    scratch.mkdir()
    shimmy_home = home / ".shimmy"
    build_shimmy_models(shimmy_home / "models", scratch)
    build_ollama_store(home / "ollama-store", smollm2_path)
    build_hf_cache(home / "hf" / "hub", scratch)
    build_lmstudio(home / ".lmstudio" / "models")
    env = {"HOME": str(home), "SHIMMY_HOME": str(shimmy_home), "OLLAMA_MODELS": str(home / "ollama-store"),
           "HF_HOME": str(home / "hf"), "XDG_CACHE_HOME": str(home / ".cache")}
    return {"home": home, "shimmy_home": shimmy_home, "env": env, "smollm2": smollm2_path}


@pytest.fixture
def use_env(monkeypatch):
    """Point HOME and every store variable at the test's world; never at the developer's stores."""
    def apply(env: dict[str, str]) -> None:
        for var in (*STORE_VARS, "SHIMMY_MODEL_PATHS"):
            monkeypatch.delenv(var, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    return apply


def catalog_for(env: dict[str, str], use_env, **flags) -> ModelCatalog:
    """A catalog over the built-in source and format plugins, registered through their hooks."""
    use_env(env)
    pm = create_plugin_manager(load_entry_points=False, extra_plugins=DISCOVERY_PLUGINS)
    settings = Settings.load({"demo": False, **flags}, env)
    catalog = ModelCatalog(build_registry(pm, settings).sources.values())
    catalog.refresh()
    return catalog


@pytest.fixture
def catalog(world, use_env) -> ModelCatalog:
    return catalog_for(world["env"], use_env)


def by_id(catalog: ModelCatalog) -> dict[str, ModelInfo]:
    return {m.id: m for m in catalog.list()}


def skipped_by_name(catalog: ModelCatalog) -> dict[str, SkippedFile]:
    return {(s.name or Path(s.path).name): s for s in catalog.skipped()}


# ------------------------------------------------------------------ what is listed, under which names
def test_hook_shimmy_register_sources_builtin_sources(world, use_env):
    use_env(world["env"])
    pm = create_plugin_manager(load_entry_points=False, extra_plugins=DISCOVERY_PLUGINS)
    registry = build_registry(pm, Settings.load({}, world["env"]))
    assert {registry.owners[("source", s)] for s in ("files", "registered", "dirs", "demo")} == {"local_files"}
    for name in ("ollama", "huggingface", "lmstudio"):
        assert registry.owners[("source", name)] == name
    assert registry.sources["ollama"].roots == [world["home"] / "ollama-store"]
    assert registry.sources["huggingface"].root == world["home"] / "hf" / "hub"


def test_everything_listed_under_the_names_users_know(catalog):
    models = by_id(catalog)
    assert sorted(models) == sorted([
        # ~/.shimmy/models
        "tiny-chat.Q4_K_M", "big-model",
        # Ollama
        "smollm2:135m", "someone/tiny:latest", "hf.co/acme/Tiny-GGUF:Q4_K_M",
        # Hugging Face cache
        "acme/Tiny-GGUF:tiny.Q4_K_M", "acme/Tiny-GGUF:tiny.Q8_0", "acme/Solo-GGUF", "acme/tiny-llama",
        # embedding models: listed with their kind
        "bge-small", "acme/bert-embed",
        # LM Studio
        "lmstudio-community/Tiny-Chat-GGUF:Tiny-Chat-Q4_K_M", "lmstudio-community/Tiny-Chat-GGUF:Tiny-Chat-Q6_K",
        "mlx-community/Tiny-4bit",
    ])
    assert {m.source for m in models.values()} == {"dirs", "ollama", "huggingface", "lmstudio"}
    assert {name for name, m in models.items() if m.kind != "chat"} == {"bge-small", "acme/bert-embed"}
    assert models["bge-small"].kind == models["acme/bert-embed"].kind == "embedding"
    assert models["acme/bert-embed"].extra["pooling"] == "mean" and models["acme/bert-embed"].extra["normalize"] is False


def test_gguf_metadata_read_from_the_header(catalog, world):
    info = by_id(catalog)["tiny-chat.Q4_K_M"]
    assert (info.format, info.architecture, info.quantization, info.context_length) == ("gguf", "llama", "Q4_K_M", 4096)
    assert info.parameters == 2 * 4 * 32
    assert info.size_bytes == Path(info.path).stat().st_size
    assert info.created == int(Path(info.path).stat().st_mtime)
    assert info.extra["has_chat_template"] is True and info.extra["title"] == "Tiny Chat"

    smol = by_id(catalog)["smollm2:135m"]
    assert (smol.architecture, smol.quantization, smol.context_length) == ("llama", "Q4_1", 8192)
    assert smol.parameters == 134_515_008
    assert smol.size_bytes == world["smollm2"].stat().st_size
    assert smol.owned_by == "library"


def test_ollama_template_system_and_params_layers_become_hints(catalog):
    smol = by_id(catalog)["smollm2:135m"]
    assert smol.path.endswith("/blobs/sha256-" + sha256_file(Path(smol.path)))
    assert smol.extra["stop"] == ("<|im_start|>", "<|im_end|>")
    assert smol.extra["system"].startswith("You are a helpful AI assistant")
    assert smol.extra["template"] == SMOLLM2_TEMPLATE
    assert smol.extra["template_hint"] == "chatml"
    assert smol.extra["options"] == {"temperature": 0.2}


def test_ollama_names(catalog):
    # The same blob and layers under two tags is one model; every tag still resolves.
    assert catalog.get("smollm2:latest").id == "smollm2:135m"
    assert catalog.get("smollm2").id == "smollm2:135m"
    assert catalog.get("ollama:smollm2:latest").id == "smollm2:135m"
    assert by_id(catalog)["someone/tiny:latest"].owned_by == "someone"
    assert catalog.get("someone/tiny").id == "someone/tiny:latest"
    assert by_id(catalog)["hf.co/acme/Tiny-GGUF:Q4_K_M"].owned_by == "hf.co"


def test_huggingface_names_and_metadata(catalog):
    models = by_id(catalog)
    q8 = models["acme/Tiny-GGUF:tiny.Q8_0"]
    assert q8.quantization == "Q8_0" and q8.owned_by == "acme"
    assert "/snapshots/" + "a" * 40 + "/" in q8.path  # refs/main, not the older snapshot
    assert catalog.get("acme/Tiny-GGUF:Q8_0") is q8 or catalog.get("acme/Tiny-GGUF:Q8_0").id == q8.id
    assert catalog.get("tiny.Q8_0.gguf").id == q8.id
    assert catalog.get("acme/Solo-GGUF:solo-q4_0").id == "acme/Solo-GGUF"

    st = models["acme/tiny-llama"]
    assert (st.format, st.architecture, st.context_length, st.quantization) == ("safetensors", "llama", 2048, "BF16")
    assert st.parameters == 64 * 16 + 16 * 16 + 64 * 16
    assert Path(st.path).is_dir() and (Path(st.path) / "config.json").is_file()
    assert st.extra["architectures"] == ["LlamaForCausalLM"]


def test_lmstudio_names(catalog):
    models = by_id(catalog)
    assert models["lmstudio-community/Tiny-Chat-GGUF:Tiny-Chat-Q6_K"].quantization == "Q6_K"
    mlx = models["mlx-community/Tiny-4bit"]
    assert (mlx.format, mlx.quantization, mlx.context_length) == ("safetensors", "MLX 4-bit", 1024)
    assert mlx.owned_by == "mlx-community"


def test_split_gguf_is_one_model_loaded_from_the_first_part(catalog, world):
    info = by_id(catalog)["big-model"]
    parts = sorted((world["shimmy_home"] / "models" / "split").iterdir())
    assert info.path == str(parts[0]) and parts[0].name == "big-model-00001-of-00003.gguf"
    assert info.size_bytes == sum(p.stat().st_size for p in parts)
    assert info.parameters == 3 * 2 * 4 * 32
    assert (info.quantization, info.context_length) == ("Q8_0", 8192)
    assert info.extra["parts"] == tuple(str(p) for p in parts)
    assert catalog.get("big-model-00001-of-00003.gguf").id == "big-model"
    assert not any("00002" in m.id or "00003" in m.id for m in catalog.list())


def test_a_request_may_use_the_file_name_with_or_without_gguf(catalog):
    for name in ("tiny-chat.Q4_K_M", "tiny-chat.Q4_K_M.gguf", "dirs:tiny-chat.Q4_K_M", "TINY-CHAT.q4_k_m"):
        assert catalog.get(name).id == "tiny-chat.Q4_K_M", name
    assert catalog.get("/etc/passwd") is None
    assert catalog.get("no-such-model") is None


# ------------------------------------------------------------------ every skip reason
EXPECTED_SKIPS = {
    # name shown -> (category, words in the reason)
    "tiny-lora.gguf": ("adapter", "LoRA adapter"),
    "mmproj-tiny-f16.gguf": ("projector", "vision projector"),
    "clip-vit-large.gguf": ("projector", "vision projector (clip)"),
    "whisper-base.gguf": ("speech", "speech model (whisper)"),
    "flux1-schnell-Q4_0.gguf": ("diffusion", "image diffusion model (flux)"),
    "empty.gguf": ("corrupt", "empty file"),
    "truncated.gguf": ("corrupt", "truncated"),
    "not-really.gguf": ("not-gguf", "named .gguf but not a GGUF file (bad magic)"),
    "hostile-count.gguf": ("corrupt", "tensor count too large"),
    "hostile-keys.gguf": ("corrupt", "metadata key count too large"),
    "hostile-string.gguf": ("corrupt", "string length past end of file"),
    "hostile-offset.gguf": ("corrupt", "tensor data past end of file"),
    "big-model.Q8_0.gguf.part": ("incomplete", "incomplete download"),
    "other.gguf.incomplete": ("incomplete", "incomplete download"),
    "half-model-00001-of-00002.gguf": ("incomplete", "part(s) 2 of 2 missing"),
    "model.pth": ("unsupported-format", "PyTorch pickle"),
    # Ollama (by name)
    "ghost:latest": ("incomplete", "incomplete pull"),
    "evil:latest": ("corrupt", "bad layer digest"),
    # Hugging Face cache (by repo)
    "acme/custom": ("custom-code", "auto_map"),
    "acme/dense-embed": ("embedding", "module sentence_transformers.models.Dense is not supported"),
    "acme/old-pickle": ("unsupported-format", "pytorch_model.bin"),
}


def test_every_skip_has_its_reason(catalog):
    skipped = catalog.skipped()
    shown = skipped_by_name(catalog)
    for name, (category, words) in EXPECTED_SKIPS.items():
        assert name in shown, f"{name} not reported; skipped: {sorted(shown)}"
        assert shown[name].category == category, (name, shown[name])
        assert words in shown[name].reason, (name, shown[name].reason)
    hf = [s for s in skipped if s.source == "huggingface"]
    assert any(s.category == "incomplete" and s.path.endswith(".incomplete") and s.name == "acme/Tiny-GGUF" for s in hf)
    assert any(s.category == "projector" and s.path.endswith("mmproj-tiny-f16.gguf") for s in hf)
    assert any(s.name == "acme/Solo-GGUF" and "broken link" in s.reason and s.category == "incomplete" for s in hf)
    # Nothing hidden is read, nothing is reported twice through the symlink loop.
    assert not any("secret" in s.path or "/.hidden/" in s.path for s in skipped)
    assert not any("/loop/" in s.path for s in skipped) and not any("/loop/" in m.path for m in catalog.list())
    # Non-model files are not reported at all.
    assert not any(s.path.endswith(("README.md", ".json", "tokenizer.json")) for s in skipped)


def test_hostile_files_are_refused_quickly(tmp_path):
    for kind in ("count", "keys", "string", "offset"):
        (tmp_path / f"{kind}.gguf").write_bytes(hostile_gguf(kind))
    started = time.perf_counter()
    found = scanner().walk(tmp_path)
    assert time.perf_counter() - started < 10  # a hang guard: the claimed sizes are never read
    assert [f.result.category for f in found] == ["corrupt"] * 4


def test_pytorch_pickles_are_never_opened(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (folder / "pytorch_model.bin").write_bytes(b"x")
    [found] = scanner().walk(tmp_path)
    assert found.result.category == "unsupported-format" and "never loaded" in found.result.reason


# ------------------------------------------------------------------ names: clashes never drop a model
class Fixed:
    def __init__(self, name: str, priority: int, *infos: ModelInfo):
        self.name, self.priority, self.infos = name, priority, infos

    def discover(self) -> DiscoveryResult:
        return DiscoveryResult(models=list(self.infos))


def info(model_id: str, path: str, source: str, **extra) -> ModelInfo:
    return ModelInfo(id=model_id, path=path, format="gguf", source=source, extra=extra)


def test_same_name_from_two_sources_keeps_both_visibly(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    # Registered in the "wrong" order: the priority decides, not the order of registration.
    catalog = ModelCatalog([Fixed("ollama", 30, info("llama3:8b", str(b), "ollama")),
                            Fixed("dirs", 20, info("llama3:8b", str(a), "dirs"))])
    catalog.refresh()
    assert {m.id: m.path for m in catalog.list()} == {"llama3:8b": str(a), "ollama:llama3:8b": str(b)}
    assert catalog.get("dirs:llama3:8b").path == str(a)
    assert catalog.get("ollama:llama3:8b").path == str(b)
    [note] = catalog.notes()
    assert "'llama3:8b' names two models" in note and "ollama:llama3:8b" in note


def test_same_file_found_twice_is_listed_once_with_both_names(tmp_path):
    a = tmp_path / "a.gguf"
    a.write_bytes(b"a")
    (tmp_path / "link.gguf").symlink_to(a)
    catalog = ModelCatalog([Fixed("dirs", 20, info("a", str(a), "dirs")),
                            Fixed("lmstudio", 50, info("pub/repo", str(tmp_path / "link.gguf"), "lmstudio"))])
    catalog.refresh()
    assert [m.id for m in catalog.list()] == ["a"]
    assert catalog.get("pub/repo").id == "a" and catalog.get("lmstudio:pub/repo").id == "a"
    assert "listed once" in catalog.notes()[0]


def test_same_blob_with_other_settings_is_another_model(tmp_path):
    a = tmp_path / "blob"
    a.write_bytes(b"a")
    catalog = ModelCatalog([Fixed("ollama", 30, info("llama3:8b", str(a), "ollama", variant=("t1",)),
                                  info("my-llama:latest", str(a), "ollama", variant=("t1", "system2")))])
    catalog.refresh()
    assert sorted(m.id for m in catalog.list()) == ["llama3:8b", "my-llama:latest"]


def test_three_models_one_name(tmp_path):
    paths = []
    for n in range(3):
        paths.append(tmp_path / f"{n}.gguf")
        paths[-1].write_bytes(bytes([n]))
    catalog = ModelCatalog([Fixed("dirs", 20, *(info("m", str(p), "dirs") for p in paths))])
    catalog.refresh()
    assert sorted(m.id for m in catalog.list()) == ["dirs:m", "dirs:m~2", "m"]


def test_a_broken_source_is_reported_and_the_others_still_list(tmp_path):
    class Broken:
        name = "broken"

        def discover(self):
            raise RuntimeError("disk on fire")

    a = tmp_path / "a.gguf"
    a.write_bytes(b"a")
    catalog = ModelCatalog([Broken(), Fixed("dirs", 20, info("a", str(a), "dirs"))])
    catalog.refresh()
    assert [m.id for m in catalog.list()] == ["a"]
    [failure] = catalog.skipped()
    assert failure.source == "broken" and "disk on fire" in failure.reason


def test_demo_model_only_when_nothing_else(world, use_env, tmp_path):
    empty = {"HOME": str(tmp_path), "SHIMMY_HOME": str(tmp_path / ".shimmy"), "OLLAMA_MODELS": str(tmp_path / "o"),
             "HF_HOME": str(tmp_path / "hf")}
    alone = catalog_for(empty, use_env, demo=True)
    assert [m.id for m in alone.list()] == ["SmolLM2-135M-Instruct"]
    assert alone.get("smollm2").id == "SmolLM2-135M-Instruct"
    crowded = catalog_for(world["env"], use_env, demo=True)
    assert "SmolLM2-135M-Instruct" not in by_id(crowded)


def test_repo_names_helper(tmp_path):
    def found(rel: str) -> discovery.Found:
        facts = discovery.ModelFacts(str(tmp_path / rel), "gguf", 1, 0, quantization="Q4_0")
        return discovery.Found(tmp_path / rel, rel, "x", facts)

    one = [found("x.gguf")]
    assert repo_names("org/x", one) == {0: ("org/x", ("org/x:x", "org/x:Q4_0"))}
    two = one + [found("sub/x.gguf")]
    assert repo_names("org/x", two) == {0: ("org/x:x", ()), 1: ("org/x:sub/x", ())}


# ------------------------------------------------------------------ the running catalog follows the disk
def test_refresh_sees_added_and_removed_files_and_caches_headers(tmp_path):
    models = tmp_path / "models"
    write_gguf(models / "one.gguf")
    source = local_files.ModelDirs([models], FORMATS)
    catalog = ModelCatalog([source], refresh_interval=0.0)
    assert [m.id for m in catalog.list()] == ["one"]
    reads = source.scanner.header_reads
    assert [m.id for m in catalog.list()] == ["one"]
    assert source.scanner.header_reads == reads, "an unchanged file was read again"
    write_gguf(models / "two.gguf")
    assert sorted(m.id for m in catalog.list()) == ["one", "two"]
    assert source.scanner.header_reads == reads + 1
    (models / "one.gguf").unlink()
    assert [m.id for m in catalog.list()] == ["two"]
    write_gguf(models / "two.gguf", file_type=7)  # rewritten in place: read again
    os.utime(models / "two.gguf", ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert catalog.get("two").quantization == "Q8_0"


def test_catalog_rescans_at_most_every_interval(tmp_path):
    calls = []

    class Counting:
        name = "counting"

        def discover(self):
            calls.append(1)
            return DiscoveryResult()

    catalog = ModelCatalog([Counting()], refresh_interval=60)
    catalog.refresh()
    for _ in range(5):
        catalog.list()
        catalog.get("x")
    assert len(calls) == 1


def test_walk_is_bounded(tmp_path):
    deep = tmp_path
    for n in range(12):
        deep = deep / f"d{n}"
    write_gguf(deep / "too-deep.gguf")
    write_gguf(tmp_path / "d0" / "shallow.gguf")
    found = scanner(max_depth=6).walk(tmp_path)
    assert [f.stem for f in found] == ["shallow"]
    many = tmp_path / "many"
    many.mkdir()
    for n in range(50):
        (many / f"{n}.txt").write_bytes(b"")
    capped = scanner(max_entries=20).walk(many)
    assert capped[-1].result.category == "unsupported-format" and "scan stopped" in capped[-1].result.reason


# ------------------------------------------------------------------ SafeTensors headers
def test_safetensors_header(tmp_path):
    header = read_safetensors_header(write_safetensors(tmp_path / "m.safetensors", LLAMA_TENSORS))
    assert header.parameter_count == 64 * 16 + 16 * 16 + 64 * 16
    assert header.main_dtype == "BF16" and header.metadata == {"format": "pt"}
    assert header.tensor_names[0] == "model.embed_tokens.weight"


def _st(header: bytes, data: int = 0) -> bytes:
    return struct.pack("<Q", len(header)) + header + bytes(data)


@pytest.mark.parametrize("raw, reason", [
    (b"", "too short"),
    (struct.pack("<Q", 2**63) + b"{}", "past end of file"),
    (_st(b"[1,2,3]"), "not a JSON object"),
    (_st(b"{bad:1}"), "not valid JSON"),
    (_st(b'{"w":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}')[:40], "past end of file"),
    (_st(b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'), "past end of file"),
    (_st(b'{"w":{"dtype":"X","shape":[4],"data_offsets":[0,16]}}', 16), "unknown dtype"),
    (_st(b'{"w":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}}', 16), "does not match"),
    (_st(b'{"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}}', 16), "invalid shape"),
    (_st(b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}}', 16), "invalid data_offsets"),
    (_st(b'{"w":{"dtype":"F32","shape":' + b"[1]" * 0 + b"[1,1,1,1,1,1,1,1,1]" + b',"data_offsets":[0,4]}}', 4),
     "invalid shape"),
    (_st(b'{"w":{"dtype":"F32","shape":[1' + b"0" * 5000 + b'],"data_offsets":[0,4]}}', 4), "not valid JSON"),
    (_st(b"[" * 4000 + b"]" * 4000), "not a JSON object"),
    (_st(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "not valid JSON"),
], ids=["empty", "huge-length", "array", "bad-json", "cut", "data-missing", "dtype", "size", "negative-dim",
        "offsets", "too-many-dims", "huge-int", "deep-array", "deep-nesting"])
def test_safetensors_hostile_headers(tmp_path, raw, reason):
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw)
    with pytest.raises(SafeTensorsError, match=reason.replace("(", r"\(")):
        read_safetensors_header(path)


def test_safetensors_truncated_folder_is_skipped(tmp_path):
    folder = hf_model_folder(tmp_path / "m", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    write_safetensors(folder / "model.safetensors", LLAMA_TENSORS, truncate=100)
    [found] = scanner().walk(tmp_path)
    assert found.result.category == "corrupt" and "truncated download" in found.result.reason


def test_safetensors_sharded_folder_with_a_missing_shard(tmp_path):
    folder = hf_model_folder(tmp_path / "m", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    [found] = scanner().walk(tmp_path)
    assert found.result.category == "incomplete" and "1 of 2 weight shards missing" in found.result.reason
    write_safetensors(folder / "model-00002-of-00002.safetensors", {"lm_head.weight": ("F16", [8, 8])})
    [found] = scanner().walk(tmp_path)
    assert found.result.parameters == 64 * 16 + 16 * 16 + 64 * 16 + 64


def test_loose_safetensors_files_are_named(tmp_path):
    write_safetensors(tmp_path / "sd_xl_base_1.0.safetensors", {"model.diffusion_model.x": ("F16", [2])})
    write_safetensors(tmp_path / "style-lora.safetensors", {"lora_unet_x.lora_down.weight": ("F16", [2])})
    write_safetensors(tmp_path / "weights.safetensors", {"x": ("F16", [2])})
    reasons = {f.path.name: f.result.category for f in scanner().walk(tmp_path)}
    assert reasons == {"sd_xl_base_1.0.safetensors": "diffusion", "style-lora.safetensors": "adapter",
                       "weights.safetensors": "not-a-model"}


def test_size_label_parsing():
    assert parse_size_label("135M") == 135_000_000
    assert parse_size_label("8x7B") == 56_000_000_000
    assert parse_size_label("1.5B") == 1_500_000_000
    assert parse_size_label("big") is None and parse_size_label(None) is None


# ------------------------------------------------------------------ shimmy add / remove (the registry file)
def test_registry_add_remove_round_trip(tmp_path, use_env):
    from shimmy_core import registered_models

    home = tmp_path / ".shimmy"
    one = write_gguf(tmp_path / "elsewhere" / "one.Q4_K_M.gguf")
    entry, names = registered_models.add(home, one, formats=FORMATS)
    assert names == ["one.Q4_K_M"] and entry.path == str(one.resolve())
    with pytest.raises(registered_models.RegistryError, match="already registered"):
        registered_models.add(home, one, "again", formats=FORMATS)
    folder = tmp_path / "folder"
    write_gguf(folder / "a.gguf")
    write_gguf(folder / "b.gguf")
    with pytest.raises(registered_models.RegistryError, match="holds 2 models; --name needs a single model"):
        registered_models.add(home, folder, "x", formats=FORMATS)
    _, names = registered_models.add(home, folder, formats=FORMATS)
    assert names == ["folder:a", "folder:b"]
    write_gguf(tmp_path / "lora.gguf", kind="adapter")
    with pytest.raises(registered_models.RegistryError, match="holds no model Shimmy can serve.*LoRA adapter"):
        registered_models.add(home, tmp_path / "lora.gguf", formats=FORMATS)
    with pytest.raises(registered_models.RegistryError, match="no such file"):
        registered_models.add(home, tmp_path / "nope.gguf", formats=FORMATS)
    with pytest.raises(registered_models.RegistryError, match="invalid name"):
        registered_models.add(home, write_gguf(tmp_path / "c.gguf"), " spaced name", formats=FORMATS)

    source = local_files.RegisteredModels(home, FORMATS)
    catalog = ModelCatalog([source], refresh_interval=0)
    assert sorted(m.id for m in catalog.list()) == ["folder:a", "folder:b", "one.Q4_K_M"]
    one.unlink()
    assert [s.reason for s in catalog.skipped()] == [
        "registered path no longer exists (shimmy remove one.Q4_K_M forgets it)"]
    registered_models.remove(home, "one.Q4_K_M")
    assert sorted(m.id for m in catalog.list()) == ["folder:a", "folder:b"] and catalog.skipped() == []
    with pytest.raises(registered_models.RegistryError, match="not registered"):
        registered_models.remove(home, "one.Q4_K_M")
    assert (folder / "a.gguf").exists(), "remove never deletes model files"

    registered_models.registry_path(home).write_text("{not json")
    assert catalog.list() == [] and catalog.skipped()[0].category == "corrupt"
