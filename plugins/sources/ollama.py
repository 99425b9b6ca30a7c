"""Discovery source for the Ollama model store (``$OLLAMA_MODELS`` or
``~/.ollama/models``): the models a user pulled with ``ollama pull``, served
from Ollama's own files (nothing is copied) under the names Ollama users know
(``llama3:8b``; ``user/model:tag`` outside the ``library`` namespace;
``host/namespace/model:tag`` from another registry).

Layout: ``manifests/<registry>/<namespace>/<model>/<tag>`` is an OCI-style
JSON manifest whose layers point at ``blobs/sha256-<hex>``.  The
``application/vnd.ollama.image.model`` layer is the GGUF file; the template,
system and params layers become hints on the model (``extra``: ``stop``,
``system``, ``template``, ``template_hint``, ``options``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from shimmy_core.plugin_api import (
    ADAPTER,
    CORRUPT,
    DiscoveryResult,
    Found,
    hookimpl,
    INCOMPLETE,
    MISSING,
    ModelFacts,
    ModelFormat,
    NOT_A_MODEL,
    read_json,
    Scanner,
    Skip,
)

MEDIA = "application/vnd.ollama.image."
MODEL, TEMPLATE, SYSTEM, PARAMS = MEDIA + "model", MEDIA + "template", MEDIA + "system", MEDIA + "params"
PROJECTOR, ADAPTER_LAYER = MEDIA + "projector", MEDIA + "adapter"
DEFAULT_REGISTRY = "registry.ollama.ai"
DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_LAYER_BYTES = 256 * 1024
MAX_MANIFESTS = 20_000
MAX_STOPS = 16
# Markers of well-known prompt formats in Ollama's Go templates.
TEMPLATE_HINTS = (
    ("<|im_start|>", "chatml"),
    ("<|start_header_id|>", "llama3"),
    ("<start_of_turn>", "gemma"),
    ("[INST]", "mistral"),
    ("<|user|>", "phi3"),
    ("<｜User｜>", "deepseek"),
    ("### Instruction", "alpaca"),
)


def ollama_roots(environ: Mapping[str, str], home: Path) -> list[Path]:
    """Where Ollama keeps models: ``$OLLAMA_MODELS``, else the user's and the Linux service's store."""
    if environ.get("OLLAMA_MODELS"):
        return [Path(environ["OLLAMA_MODELS"]).expanduser()]
    return [home / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def ollama_name(registry: str, namespace: str, model: str, tag: str) -> str:
    """The name ``ollama list`` shows (without ``:latest`` it is an alias)."""
    if registry == DEFAULT_REGISTRY:
        return f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
    return f"{registry}/{namespace}/{model}:{tag}"


def template_hint(template: str) -> str | None:
    """The prompt format an Ollama Go template spells (``chatml``, ``llama3``...), if recognised."""
    return next((hint for marker, hint in TEMPLATE_HINTS if marker in template), None)


class OllamaStore:
    """Models pulled with Ollama."""

    name = "ollama"
    priority = 30

    def __init__(self, roots: list[Path], formats: Iterable[ModelFormat]):
        self.roots = roots
        self.scanner = Scanner(formats)

    def discover(self) -> DiscoveryResult:
        self.scanner.start_pass()
        result = DiscoveryResult()
        for root in dict.fromkeys(self.roots):
            for manifest, parts in _manifests(root / "manifests"):
                self._manifest(root, manifest, parts, result)
        return result

    def _manifest(self, root: Path, path: Path, parts: tuple[str, str, str, str], result: DiscoveryResult) -> None:
        name = ollama_name(*parts)
        found = self._describe(root, path)
        if isinstance(found, Skip):
            result.skipped.append(found.skipped(path, self.name, name))
            return
        facts, extra = found
        aliases = (name[: -len(":latest")],) if name.endswith(":latest") else ()
        owned_by = parts[1] if parts[0] == DEFAULT_REGISTRY else parts[0]
        Found(path, "", name, facts).add_to(result, self.name, name, aliases=aliases, owned_by=owned_by, extra=extra)

    def _describe(self, root: Path, path: Path) -> tuple[ModelFacts, dict[str, Any]] | Skip:
        try:
            st = os.stat(path)
        except OSError as exc:
            return Skip(f"unreadable manifest: {exc.strerror or exc}", CORRUPT)
        manifest = self.scanner.cached("manifest", path, (st.st_size, st.st_mtime_ns, st.st_ino), lambda: _load(path))
        if isinstance(manifest, Skip):
            return manifest
        layers = manifest["layers"]
        models = [layer for layer in layers if layer.get("mediaType") == MODEL]
        if not models:
            return Skip("Ollama manifest without a model layer", NOT_A_MODEL)
        if any(layer.get("mediaType") == ADAPTER_LAYER for layer in layers):
            return Skip("Ollama model with a LoRA adapter layer (adapters are not applied yet)", ADAPTER)
        blob = _blob(root, models[0])
        if isinstance(blob, Skip):
            return blob
        try:
            blob_st = os.stat(blob)
        except FileNotFoundError:
            partial = any(p.name.startswith(blob.name + "-partial") for p in _list(blob.parent))
            if partial:
                return Skip(f"incomplete pull ({blob.name}-partial): finish it with ollama pull", INCOMPLETE)
            return Skip(f"model blob missing ({blob})", MISSING)
        except OSError as exc:
            return Skip(f"unreadable model blob: {exc.strerror or exc}", CORRUPT)
        expected = models[0].get("size")
        if isinstance(expected, int) and blob_st.st_size < expected:
            return Skip(f"incomplete pull: blob has {blob_st.st_size} of {expected} bytes", INCOMPLETE)
        facts = self.scanner.inspect_as("gguf", blob)  # Ollama's model layers are GGUF files
        if isinstance(facts, Skip):
            return facts
        return facts, self._hints(root, layers)

    def _hints(self, root: Path, layers: list[dict]) -> dict[str, Any]:
        extra: dict[str, Any] = {"ollama": True}
        variant = []
        for layer in layers:
            media = layer.get("mediaType")
            if media not in (TEMPLATE, SYSTEM, PARAMS, PROJECTOR):
                continue
            blob = _blob(root, layer)
            if isinstance(blob, Skip):
                continue
            if media == PROJECTOR:
                extra["projector"] = str(blob)
                continue
            text = self._text(blob)
            if text is None:
                continue
            variant.append(str(layer.get("digest")))
            if media == TEMPLATE:
                extra["template"] = text
                hint = template_hint(text)
                if hint:
                    extra["template_hint"] = hint
            elif media == SYSTEM:
                extra["system"] = text
            else:
                extra.update(_params(text))
        if variant:
            extra["variant"] = tuple(variant)
        return extra

    def _text(self, blob: Path) -> str | None:
        try:
            st = os.stat(blob)
        except OSError:
            return None
        if st.st_size > MAX_LAYER_BYTES:
            return None

        def read() -> str | None:
            try:
                return blob.read_bytes()[:MAX_LAYER_BYTES].decode("utf-8", "replace")
            except OSError:
                return None

        return self.scanner.cached("layer", blob, (st.st_size, st.st_mtime_ns, st.st_ino), read)


def _params(text: str) -> dict[str, Any]:
    """Ollama's params layer: ``stop`` becomes stop strings, everything else ``options``."""
    try:
        params = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(params, dict):
        return {}
    out: dict[str, Any] = {}
    stop = params.pop("stop", None)
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list):
        stops = tuple(s for s in stop if isinstance(s, str) and 0 < len(s) <= 256)[:MAX_STOPS]
        if stops:
            out["stop"] = stops
    options = {k: v for k, v in params.items() if isinstance(k, str) and isinstance(v, (int, float, str, bool))}
    if options:
        out["options"] = options
    return out


def _load(path: Path) -> dict | Skip:
    try:
        manifest = read_json(path, MAX_MANIFEST_BYTES)
    except ValueError as exc:
        return Skip(f"corrupt Ollama manifest: {exc}", CORRUPT)
    except OSError as exc:
        return Skip(f"unreadable manifest: {exc.strerror or exc}", CORRUPT)
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
        return Skip("corrupt Ollama manifest: no list of layers", CORRUPT)
    return {"layers": layers}


def _blob(root: Path, layer: dict) -> Path | Skip:
    """``blobs/sha256-<hex>`` for a layer; any other digest is refused (no path tricks)."""
    digest = layer.get("digest")
    match = DIGEST_RE.match(digest) if isinstance(digest, str) else None
    if not match:
        return Skip(f"corrupt Ollama manifest: bad layer digest {str(digest)[:80]!r}", CORRUPT)
    return root / "blobs" / f"sha256-{match.group(1)}"


def _list(directory: Path) -> list[Path]:
    try:
        with os.scandir(directory) as it:
            return [Path(e.path) for e in it]
    except OSError:
        return []


def _dirs(directory: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError:
        return []


def _manifests(top: Path):
    """``(path, (registry, namespace, model, tag))`` for each manifest, at most ``MAX_MANIFESTS``."""
    seen = 0
    for registry in _dirs(top):
        for namespace in _dirs(Path(registry.path)) if registry.is_dir() else ():
            for model in _dirs(Path(namespace.path)) if namespace.is_dir() else ():
                for tag in _dirs(Path(model.path)) if model.is_dir() else ():
                    if not tag.is_file():
                        continue
                    seen += 1
                    if seen > MAX_MANIFESTS:
                        return
                    yield Path(tag.path), (registry.name, namespace.name, model.name, tag.name)


@hookimpl
def shimmy_register_sources(register, settings, formats):
    register(OllamaStore(ollama_roots(os.environ, Path.home()), formats))
