"""Models: what discovery sources find (:class:`ModelInfo`), the catalog that
names them, and the manager that loads each one once and shares it."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Protocol, runtime_checkable

from shimmy_core.backend import BackendUnavailable, LoadedModel

if TYPE_CHECKING:  # pragma: no cover
    from shimmy_core.plugin_manager import ShimmyPluginManager
    from shimmy_core.registry import Registry
    from shimmy_core.settings import Settings


@dataclass(frozen=True)
class ModelInfo:
    """A servable model, described without loading it."""

    id: str
    path: str
    format: str                          # "gguf", "safetensors", ...
    source: str                          # name of the discovery source
    created: int = 0                     # file modification time (unix seconds)
    owned_by: str = "local"
    size_bytes: int = 0
    context_length: int | None = None
    architecture: str | None = None
    quantization: str | None = None
    parameters: int | None = None
    aliases: tuple[str, ...] = ()        # other names a request may use (file name, ...)
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def describe(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        data.pop("aliases")
        return data


@dataclass(frozen=True)
class SkippedFile:
    """A file a source saw but will not serve, and why."""

    path: str
    reason: str
    source: str = ""


@dataclass
class DiscoveryResult:
    models: list[ModelInfo] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)


@runtime_checkable
class DiscoverySource(Protocol):
    name: str

    def discover(self) -> DiscoveryResult:
        """Look for models now; must be fast and must not load any model."""


class ModelCatalog:
    """Every model the registered sources find, under unique, stable ids.

    Discovery results are cached; :meth:`refresh` rescans (cheap, header reads only).
    """

    def __init__(self, sources: Iterable[DiscoverySource], refresh_interval: float = 2.0):
        self._sources = list(sources)
        self._lock = threading.Lock()
        self._models: dict[str, ModelInfo] = {}
        self._aliases: dict[str, str] = {}
        self._skipped: list[SkippedFile] = []
        self._scanned_at = 0.0
        self._refresh_interval = refresh_interval

    def refresh(self) -> None:
        models: dict[str, ModelInfo] = {}
        aliases: dict[str, str] = {}
        skipped: list[SkippedFile] = []
        for source in self._sources:
            try:
                result = source.discover()
            except Exception as exc:  # a broken source must not hide the others
                skipped.append(SkippedFile(path="", reason=f"source failed: {exc}", source=source.name))
                continue
            skipped.extend(result.skipped)
            for info in result.models:
                if info.id in models:
                    if models[info.id].path == info.path:
                        continue  # the same file found twice
                    qualified = f"{info.source}:{info.id}"
                    info = _with_id(info, qualified)
                models[info.id] = info
        if any(not info.extra.get("fallback") for info in models.values()):
            # A fallback (the demo model) is served only when nothing else is found.
            models = {k: v for k, v in models.items() if not v.extra.get("fallback")}
        for model_id, info in models.items():
            for alias in info.aliases:
                aliases.setdefault(alias, model_id)
        with self._lock:
            self._models, self._aliases, self._skipped = models, aliases, skipped
            self._scanned_at = time.monotonic()

    def _fresh(self) -> None:
        if time.monotonic() - self._scanned_at > self._refresh_interval:
            self.refresh()

    def list(self) -> list[ModelInfo]:
        self._fresh()
        return list(self._models.values())

    def skipped(self) -> list[SkippedFile]:
        self._fresh()
        return list(self._skipped)

    def get(self, model_id: str) -> ModelInfo | None:
        """Find a model by id or alias.  Only known ids resolve: a path is just an unknown name."""
        self._fresh()
        models, aliases = self._models, self._aliases
        if model_id in models:
            return models[model_id]
        target = aliases.get(model_id)
        return models.get(target) if target else None


def _with_id(info: ModelInfo, new_id: str) -> ModelInfo:
    from dataclasses import replace

    return replace(info, id=new_id)


class ModelManager:
    """Loads each model once, on first use, with the backend a decision hook picks."""

    def __init__(self, pm: "ShimmyPluginManager", registry: "Registry", settings: "Settings"):
        self._pm = pm
        self._registry = registry
        self._settings = settings
        self._loaded: dict[str, LoadedModel] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def backend_for(self, info: ModelInfo):
        name = self._pm.hook.shimmy_backend_for_model(model=info, backends=dict(self._registry.backends))
        if name is None or name not in self._registry.backends:
            raise BackendUnavailable(f"no backend can serve {info.format} models (model {info.id!r})")
        return self._registry.backends[name]

    def get(self, info: ModelInfo) -> LoadedModel:
        key = info.path
        loaded = self._loaded.get(key)
        if loaded is not None:
            return loaded
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            loaded = self._loaded.get(key)
            if loaded is None:
                backend = self.backend_for(info)
                reason = backend.unavailable_reason()
                if reason:
                    raise BackendUnavailable(reason)
                loaded = backend.load(info, self._settings)
                self._loaded[key] = loaded
        return loaded

    def loaded_paths(self) -> list[str]:
        return list(self._loaded)

    def close(self) -> None:
        for loaded in self._loaded.values():
            loaded.close()
        self._loaded.clear()
