"""The models a user registered with ``shimmy add``: a small JSON file under
Shimmy's home (``$SHIMMY_HOME/registered-models.json``).  ``shimmy remove``
forgets an entry; model files are never moved or deleted.

The file is rewritten atomically (temporary file, then rename), so a running
server that rereads it between two refreshes never sees half of it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from shimmy_core.contract.model_formats import ModelFacts, ModelFormat
from shimmy_core.contract.settings import Settings, SettingsError
from shimmy_core.discovery import Scanner, repo_names

REGISTRY_FILE = "registered-models.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,199}$")


class RegistryError(ValueError):
    """``shimmy add``/``remove`` refused; the message says why."""


@dataclass(frozen=True)
class Entry:
    name: str
    path: str
    added: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # the model's own settings (MODEL_OPTIONS)


def registry_path(home: Path) -> Path:
    return Path(home) / REGISTRY_FILE


def load_entries(home: Path) -> list[Entry]:
    """The registered entries; a missing file is an empty registry, a broken one raises RegistryError."""
    path = registry_path(home)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    try:
        doc = json.loads(raw)
        return [Entry(str(e["name"]), str(e["path"]), int(e.get("added", 0)), dict(e.get("options") or {}))
                for e in doc["models"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"{path} is damaged ({type(exc).__name__}: {exc}); fix or delete it") from None


def _save(home: Path, entries: list[Entry]) -> None:
    path = registry_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": 1, "models": [e.__dict__ for e in entries]}
    fd, tmp = tempfile.mkstemp(prefix=".registered-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def add(home: Path, path: str | os.PathLike[str], name: str | None = None, *,
        formats: Iterable[ModelFormat], options: Mapping[str, Any] | None = None) -> tuple[Entry, list[str]]:
    """Validate ``path`` (a model file or a folder holding models) and remember it, with the
    model's own ``options`` (how it loads: ``{"ctx_size": 4096, "moe_offload": "all"}``...).

    ``formats`` (the registered model formats) say what the files are, as discovery would.
    Returns the entry and the names its models will have.  Refuses a path that
    holds no servable model (with the reasons), a bad or taken name, and
    ``--name`` for a folder holding several models.
    """
    options = {k: v for k, v in (options or {}).items() if v is not None}
    try:
        Settings(demo=False).with_options(options)
    except SettingsError as exc:
        raise RegistryError(str(exc)) from None
    target = Path(path).expanduser().resolve()
    if not target.exists():
        raise RegistryError(f"{target}: no such file or folder")
    found = Scanner(formats).path(target)
    servable = [f for f in found if isinstance(f.result, ModelFacts)]
    if not servable:
        reasons = "; ".join(f"{f.path.name}: {f.result.reason}" for f in found[:5]) or "no model files found"
        raise RegistryError(f"{target} holds no model Shimmy can serve ({reasons})")
    if name is not None and len(servable) > 1:
        raise RegistryError(f"{target} holds {len(servable)} models; --name needs a single model "
                            "(add one file, or leave out --name)")
    entry_name = name or (servable[0].stem if target.is_file() else target.name)
    if not NAME_RE.match(entry_name):
        raise RegistryError(f"invalid name {entry_name!r}: use letters, digits and . _ - / : @ + "
                            "(at most 200 characters, starting with a letter or digit)")
    entries = load_entries(home)
    for entry in entries:
        if entry.name == entry_name:
            raise RegistryError(f"{entry_name!r} is already registered ({entry.path}); "
                                f"shimmy remove {entry_name} first, or choose another --name")
        if Path(entry.path) == target:
            raise RegistryError(f"{target} is already registered as {entry.name!r}")
    entry = Entry(entry_name, str(target), int(time.time()), options)
    _save(home, [*entries, entry])
    return entry, [model_id for model_id, _ in repo_names(entry_name, found).values()]


def remove(home: Path, name: str) -> Entry:
    """Forget the entry called ``name`` (the model files stay where they are)."""
    entries = load_entries(home)
    kept = [e for e in entries if e.name != name]
    if len(kept) == len(entries):
        known = ", ".join(e.name for e in entries) or "none"
        raise RegistryError(f"{name!r} is not registered (registered: {known})")
    _save(home, kept)
    return next(e for e in entries if e.name == name)
