"""Model formats are plugins (``shimmy_register_formats``): a new format arrives as a plugin
alone and the catalog lists its models; the core knows no format; disabling a format's
plugin stops its files being recognized, with a reason."""

from __future__ import annotations

import ast
import io
import json
import os
import tokenize
from pathlib import Path

import pytest

from shimmy_core.catalog import ModelCatalog
from shimmy_core.contract.model_formats import ModelFacts, ModelFormat, Recognized, Skip
from shimmy_core.contract.settings import Settings
from shimmy_core.discovery import NOT_A_MODEL, Scanner, stat_key
from shimmy_core.plugin_api import hookimpl
from shimmy_core.plugin_manager import create_plugin_manager
from shimmy_core.plugin_registry import DuplicateNameError, build_registry
from shimmy_plugins.backends.gguf import gguf_backend
from shimmy_plugins.backends.safetensors import safetensors_backend
from shimmy_plugins.sources import local_files
from tests.test_discovery import write_gguf

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "shimmy_core"
MAGIC = b"MLX!"


# ------------------------------------------------------------------ a format that Shimmy does not ship
class MLXFormat:
    """``*.mlx`` files (``MLX!`` then a JSON line of metadata) and ``mlx_model.json`` folders."""

    name = "mlx"
    suffixes = (".mlx",)

    def inspect_folder(self, folder, names, headers):
        if "mlx_model.json" not in names:
            return None
        meta = json.loads((folder / "mlx_model.json").read_text())
        st = os.stat(folder / "mlx_model.json")
        facts = ModelFacts(str(folder), self.name, st.st_size, int(st.st_mtime), architecture=meta["arch"])
        return Recognized(folder, facts, folder.name, leaf=True)

    def inspect_files(self, folder, files, headers):
        return [self.inspect_path(path, headers) for path in files]

    def inspect_path(self, path, headers):
        if not path.name.endswith(".mlx"):
            return None
        read = headers.read_header("mlx", path, _read_meta)
        if isinstance(read, Skip):
            return Recognized(path, read, path.stem)
        st, meta = read
        facts = ModelFacts(str(path), self.name, st.st_size, int(st.st_mtime),
                           context_length=meta["context"], architecture=meta["arch"])
        return Recognized(path, facts, path.stem, (path.name,))


def _read_meta(path: Path, st: os.stat_result) -> dict | Skip:
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            return Skip("named .mlx but not an MLX file", NOT_A_MODEL)
        return json.loads(f.readline())


class MLXPlugin:
    @hookimpl
    def shimmy_register_formats(self, register):
        register(MLXFormat())


def write_mlx(path: Path, arch: str = "mlx-llama", context: int = 8192) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(MAGIC + json.dumps({"arch": arch, "context": context}).encode() + b"\n" + bytes(64))
    return path


def registry_for(plugins, disable=(), **flags):
    pm = create_plugin_manager(disable, load_entry_points=False, extra_plugins=plugins)
    return build_registry(pm, Settings.load({"demo": False, **flags}, {"SHIMMY_HOME": "/nonexistent"}))


def test_hook_shimmy_register_formats_a_new_format_is_a_plugin_alone(tmp_path):
    models = tmp_path / "models"
    write_mlx(models / "tiny-chat.mlx")
    (models / "broken.mlx").write_bytes(b"nope")
    folder = models / "Tiny-4bit"
    folder.mkdir()
    (folder / "mlx_model.json").write_text(json.dumps({"arch": "mlx-qwen"}))
    write_mlx(folder / "inner" / "part.mlx")  # a leaf folder's insides are not models of their own
    write_gguf(models / "other.Q4_K_M.gguf")
    elsewhere = write_mlx(tmp_path / "named.mlx", context=2048)

    plugins = [("gguf", gguf_backend), ("safetensors", safetensors_backend), ("local_files", local_files),
               ("mlx", MLXPlugin())]
    registry = registry_for(plugins, model_dirs=[str(models)], models=[str(elsewhere)])
    assert registry.owners[("format", "mlx")] == "mlx"
    assert list(registry.formats) == ["gguf", "safetensors", "mlx"]
    catalog = ModelCatalog(registry.sources.values())
    catalog.refresh()

    listed = {m.id: m for m in catalog.list()}
    assert set(listed) == {"tiny-chat", "Tiny-4bit", "other.Q4_K_M", "named"}
    assert (listed["tiny-chat"].format, listed["tiny-chat"].architecture) == ("mlx", "mlx-llama")
    assert listed["tiny-chat"].context_length == 8192 and "tiny-chat.mlx" in listed["tiny-chat"].aliases
    assert (listed["Tiny-4bit"].format, listed["Tiny-4bit"].architecture) == ("mlx", "mlx-qwen")
    assert (listed["named"].source, listed["named"].context_length) == ("files", 2048)
    assert listed["other.Q4_K_M"].format == "gguf"
    [skip] = catalog.skipped()
    assert skip.path.endswith("broken.mlx") and skip.reason == "named .mlx but not an MLX file"

    # Its header reads go through the scanner's cache: a rescan of unchanged files reads nothing.
    dirs = registry.sources["dirs"]
    reads = dirs.scanner.header_reads
    catalog.refresh()
    assert dirs.scanner.header_reads == reads


def test_shimmy_add_asks_the_registered_formats(tmp_path):
    from shimmy_core import registered_models

    model = write_mlx(tmp_path / "downloads" / "tiny.mlx")
    formats = registry_for([("mlx", MLXPlugin())]).formats.values()
    entry, names = registered_models.add(tmp_path / "home", model, formats=formats)
    assert names == ["tiny"] and entry.path == str(model)
    with pytest.raises(registered_models.RegistryError, match="no plugin recognizes .gguf files"):
        registered_models.add(tmp_path / "home", write_gguf(tmp_path / "x.gguf"), formats=formats)


def test_two_plugins_registering_one_format_name_names_both():
    class Other:
        @hookimpl
        def shimmy_register_formats(self, register):
            register(MLXFormat())

    with pytest.raises(DuplicateNameError, match="format name 'mlx' is registered by both plugin 'mlx' and "
                                                 "plugin 'other'"):
        registry_for([("mlx", MLXPlugin()), ("other", Other())])


def test_the_builtin_formats_come_from_the_backend_plugins():
    registry = registry_for([("gguf", gguf_backend), ("safetensors", safetensors_backend)])
    assert {name: registry.owners[("format", name)] for name in registry.formats} == {
        "gguf": "gguf", "safetensors": "safetensors"}
    assert all(isinstance(f, ModelFormat) for f in registry.formats.values())


def test_disabling_a_format_plugin_stops_its_files_being_recognized(tmp_path):
    """A format comes and goes with its backend: with ``--disable-plugin gguf`` no GGUF model is
    listed (none could be loaded); a file named explicitly says why it is skipped."""
    model = write_gguf(tmp_path / "models" / "tiny.Q4_K_M.gguf")
    plugins = [("gguf", gguf_backend), ("safetensors", safetensors_backend), ("local_files", local_files)]
    on = registry_for(plugins, model_dirs=[str(model.parent)], models=[str(model)])
    off = registry_for(plugins, ["gguf"], model_dirs=[str(model.parent)], models=[str(model)])
    assert "gguf" in on.formats and "gguf" not in off.formats and "gguf" not in off.backends

    catalog = ModelCatalog(off.sources.values())
    catalog.refresh()
    assert catalog.list() == []
    [skip] = catalog.skipped()  # the walk passes over files no format claims; the named file says why
    assert (skip.source, skip.category) == ("files", "unsupported-format")
    assert skip.reason.startswith("no plugin recognizes .gguf files") and "shimmy plugins" in skip.reason
    assert Scanner().inspect_as("gguf", model).reason.startswith("no plugin recognizes gguf files")


# ------------------------------------------------------------------ the core knows no format
def test_the_core_has_no_header_reader_and_imports_no_format():
    assert not (CORE / "gguf_header.py").exists() and not (CORE / "safetensors_header.py").exists()
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith("shimmy_plugins"), f"{path} imports {name}"
                assert "header" not in name and "gguf" not in name and "safetensors" not in name, \
                    f"{path} imports {name}"


def test_the_core_code_names_no_format():
    """No identifier of the core mentions a format, and no string in its code is a format's name
    (docstrings and comments may speak of GGUF files; messages may suggest one)."""
    formats = ("gguf", "safetensors", "ggml")
    for path in CORE.rglob("*.py"):
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
            if tok.type == tokenize.NAME:
                assert not any(f in tok.string.lower() for f in formats), f"{path}:{tok.start[0]}: {tok.string}"
            elif tok.type == tokenize.STRING and not tok.string.startswith(('"""', "'''")):
                value = tok.string.strip("\"'").lower()
                assert value.lstrip(".") not in formats, f"{path}:{tok.start[0]}: {tok.string}"


def test_scanner_keeps_the_generic_refusals(tmp_path):
    """Partial downloads and pickle weights are refused by discovery itself, whatever the formats."""
    (tmp_path / "model.gguf.part").write_bytes(b"x")
    (tmp_path / "weights.pth").write_bytes(b"never opened")
    (tmp_path / "notes.txt").write_text("not a model")
    found = {f.path.name: f.result for f in Scanner().walk(tmp_path)}
    assert {name: skip.category for name, skip in found.items()} == {
        "model.gguf.part": "incomplete", "weights.pth": "unsupported-format"}
    assert stat_key(os.stat(tmp_path / "notes.txt"))[0] == len("not a model")


# ------------------------------------------------------------------ what a model is for
def test_gguf_kind_from_the_header():
    from shimmy_plugins.backends.gguf.gguf_format import gguf_kind
    from shimmy_plugins.backends.gguf.gguf_header import GGUFHeader

    def kind(arch, **meta):
        return gguf_kind(GGUFHeader(3, 1, {"general.architecture": arch, **meta}, 0, 1))

    assert kind("llama") == "chat"
    assert kind("bert") == kind("nomic-bert") == "embedding"
    assert kind("qwen3", **{"qwen3.pooling_type": 3}) == "embedding"  # Qwen3-Embedding: a decoder, last-token pooling
    assert kind("qwen3", **{"qwen3.pooling_type": 4}) == "rerank"
    assert kind("bert", **{"bert.classifier.output_labels": ["LABEL_0"]}) == "rerank"


def test_safetensors_kind_and_sentence_transformers_config(tmp_path):
    from shimmy_plugins.backends.safetensors.safetensors_format import config_kind, read_sentence_transformers

    assert config_kind({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, set()) == "chat"
    assert config_kind({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}, {"modules.json"}) == "embedding"
    assert config_kind({"architectures": ["BertForSequenceClassification"], "id2label": {"0": "LABEL_0"}}, set()) \
        == "rerank"
    three = config_kind({"architectures": ["BertForSequenceClassification"], "id2label": {"0": "a", "1": "b", "2": "c"}},
                        set())
    assert isinstance(three, Skip) and "3 labels" in three.reason

    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"path": "", "type": "sentence_transformers.models.Transformer"},
        {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps({"matryoshka_dimensions": [64, 256]}))
    names = {p.name for p in tmp_path.iterdir()}
    st = read_sentence_transformers(tmp_path, names)
    assert (st.pooling, st.normalize, st.max_seq_length, st.matryoshka_dimensions) == ("cls", True, 128, (256, 64))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    skip = read_sentence_transformers(tmp_path, names)
    assert isinstance(skip, Skip) and "pooling_mode_weightedmean_tokens is not supported" in skip.reason
    plain = read_sentence_transformers(tmp_path, names - {"modules.json"})
    assert (plain.pooling, plain.normalize) == ("mean", False)


def test_a_gguf_embedding_model_may_declare_matryoshka_sizes(tmp_path):
    from shimmy_plugins.backends.gguf.gguf_format import _gguf_facts
    from shimmy_plugins.backends.gguf.gguf_header import GGUFHeader

    header = GGUFHeader(3, 1, {"general.architecture": "nomic-bert", "nomic-bert.pooling_type": 1,
                               "shimmy.matryoshka_dimensions": [256, 768, 64]}, 0, 1)
    facts = _gguf_facts(tmp_path / "m.gguf", header, 1, 0, ())
    assert facts.kind == "embedding"
    assert facts.extra["matryoshka_dimensions"] == [768, 256, 64] and facts.extra["pooling_type"] == 1
