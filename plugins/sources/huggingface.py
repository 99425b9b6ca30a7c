"""Discovery source for the Hugging Face cache (``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
``~/.cache/huggingface/hub``, the order ``huggingface_hub`` itself uses).

Each ``models--org--name`` repository is read at the revision ``refs/main``
points to (the newest snapshot when there is no ``refs/main``).  A snapshot
holds GGUF files or a SafeTensors model folder (``config.json``,
``*.safetensors``, tokenizer files), as symlinks into ``blobs/``: the model
path stays the snapshot path, so llama.cpp finds the other parts of a split
GGUF next to the first.  Models are named ``org/name``, or ``org/name:file``
when a repository holds several (one per GGUF quantization, for instance).
Blobs still downloading (``*.incomplete``) are reported as skipped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Mapping

from shimmy_core.plugin_api import add_named, DiscoveryResult, hookimpl, INCOMPLETE, ModelFormat, Scanner, Skip

REPO_PREFIX = "models--"
REVISION_RE = re.compile(r"^[0-9A-Za-z._-]{1,100}$")


def hf_cache_root(environ: Mapping[str, str], home: Path) -> Path:
    """The hub cache ``huggingface_hub`` would use with this environment."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if environ.get(var):
            return Path(environ[var]).expanduser()
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser() / "hub"
    cache = Path(environ["XDG_CACHE_HOME"]).expanduser() if environ.get("XDG_CACHE_HOME") else home / ".cache"
    return cache / "huggingface" / "hub"


def repo_id(folder_name: str) -> str:
    """``models--TheBloke--Llama-2-7B-GGUF`` -> ``TheBloke/Llama-2-7B-GGUF``."""
    return folder_name[len(REPO_PREFIX):].replace("--", "/")


def snapshot(repo: Path) -> Path | None:
    """The snapshot ``refs/main`` names, else the newest one."""
    try:
        revision = (repo / "refs" / "main").read_text(encoding="utf-8", errors="replace")[:200].strip()
    except OSError:
        revision = ""
    if REVISION_RE.match(revision) and (repo / "snapshots" / revision).is_dir():
        return repo / "snapshots" / revision
    try:
        with os.scandir(repo / "snapshots") as it:
            candidates = [e for e in it if e.is_dir() and not e.name.startswith(".")]
    except OSError:
        return None
    newest = max(candidates, key=lambda e: (e.stat().st_mtime, e.name), default=None)
    return Path(newest.path) if newest else None


class HuggingFaceCache:
    """Models downloaded with ``huggingface_hub`` (``hf download``, transformers, llama.cpp ``-hf``...)."""

    name = "huggingface"
    priority = 40

    def __init__(self, root: Path, formats: Iterable[ModelFormat]):
        self.root = root
        self.scanner = Scanner(formats, max_depth=3)

    def discover(self) -> DiscoveryResult:
        self.scanner.start_pass()
        result = DiscoveryResult()
        try:
            with os.scandir(self.root) as it:
                repos = sorted((e for e in it if e.name.startswith(REPO_PREFIX) and e.is_dir()), key=lambda e: e.name)
        except OSError:
            return result
        for entry in repos:
            repo, name = Path(entry.path), repo_id(entry.name)
            for blob in _incomplete_blobs(repo):
                result.skipped.append(Skip("incomplete download (blob still downloading)", INCOMPLETE)
                                      .skipped(blob, self.name, name))
            revision = snapshot(repo)
            if revision is not None:
                owner = name.split("/", 1)[0] if "/" in name else "huggingface"
                add_named(result, self.scanner.walk(revision), name, self.name, owned_by=owner)
        return result


def _incomplete_blobs(repo: Path) -> list[Path]:
    try:
        with os.scandir(repo / "blobs") as it:
            return sorted(Path(e.path) for e in it if e.name.endswith(".incomplete"))
    except OSError:
        return []


@hookimpl
def shimmy_register_sources(register, settings, formats):
    register(HuggingFaceCache(hf_cache_root(os.environ, Path.home()), formats))
