"""Discovery source for LM Studio's model folders (``~/.lmstudio/models``,
and the older ``~/.cache/lm-studio/models``).

LM Studio keeps models as ``<publisher>/<repository>/<files>``: GGUF files,
or MLX/SafeTensors model folders.  Models are named ``publisher/repository``,
or ``publisher/repository:file`` when a repository folder holds several.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from shimmy_core.plugin_api import add_named, DiscoveryResult, Found, hookimpl, ModelFormat, Scanner


def lmstudio_roots(home: Path) -> list[Path]:
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def repository(found: Found) -> tuple[str, str]:
    """``(publisher/repository, its folder relative to the models folder)`` for a find."""
    is_folder = found.path.is_dir()
    parts = found.rel.split("/") if found.rel else []
    folder = parts if is_folder else parts[:-1]
    if len(folder) >= 2:
        return "/".join(folder[:2]), "/".join(folder[:2])
    return "/".join([*folder, found.stem]), "/".join(folder)


class LMStudioModels:
    """Models downloaded with LM Studio."""

    name = "lmstudio"
    priority = 50

    def __init__(self, roots: list[Path], formats: Iterable[ModelFormat]):
        self.roots = roots
        self.scanner = Scanner(formats, max_depth=4)

    def discover(self) -> DiscoveryResult:
        self.scanner.start_pass()
        result = DiscoveryResult()
        for root in dict.fromkeys(self.roots):
            if not root.is_dir():
                continue
            groups: dict[tuple[str, str], list[Found]] = {}
            for found in self.scanner.walk(root):
                groups.setdefault(repository(found), []).append(found)
            for (base, folder), found in groups.items():
                owner = base.split("/", 1)[0] if "/" in base else "local"
                add_named(result, found, base, self.name, owned_by=owner, root=folder)
        return result


@hookimpl
def shimmy_register_sources(register, settings, formats):
    register(LMStudioModels(lmstudio_roots(Path.home()), formats))
