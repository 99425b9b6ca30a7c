"""What a model file or folder is, read from headers only: the helpers every
discovery source shares.  Discovery knows no model format: the registered formats
(:class:`~shimmy_core.contract.model_formats.ModelFormat`, from the
``shimmy_register_formats`` hook) recognize files and folders.

A :class:`Scanner` walks a folder (bounded depth, hidden folders skipped,
symlink loops cut), asks the formats about each folder and about the files whose
names end with a suffix a format claims, and turns each thing that looks like a model
into a :class:`Found`: either :class:`ModelFacts` (servable: format, architecture,
parameters, quantization, context, size) or a :class:`Skip` (why not, with a
category such as ``adapter`` or ``incomplete``).  It never reads tensor data
and never imports an inference library.  Header reads are cached by
``(path, size, mtime, inode)`` so a rescan of an unchanged tree costs a
directory walk and a ``stat`` per model file.

What no format needs to know stays here: partial downloads (``*.part``...) are skipped, and
so are pickle weights (never loaded) and ONNX files that no format claims, with their reason.
A file named explicitly that no format recognizes says so (``no plugin recognizes .gguf
files``: its format plugin is disabled or missing).

Sources (``plugins/sources/local_files.py``, ``ollama.py``, ``huggingface.py``,
``lmstudio.py``) only decide where to look and what to call things;
:func:`repo_names` names the models of one repository the same way everywhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

from shimmy_core.contract.model_formats import ModelFacts, ModelFormat, Recognized, Skip
from shimmy_core.contract.model_info import DiscoveryResult

T = TypeVar("T")

MAX_DEPTH = 6
MAX_ENTRIES = 200_000           # directory entries one walk looks at before it gives up
MAX_JSON_BYTES = 16 * 1024 * 1024

# ------------------------------------------------------------------ skip categories
ADAPTER = "adapter"
PROJECTOR = "projector"
SPEECH = "speech"
DIFFUSION = "diffusion"
EMBEDDING = "embedding"
VISION = "vision"
INCOMPLETE = "incomplete"
CORRUPT = "corrupt"
UNSUPPORTED = "unsupported-format"
NOT_A_MODEL = "not-a-model"
MISSING = "missing"
UNREADABLE = "unreadable"

INCOMPLETE_SUFFIXES = (".partial", ".incomplete", ".part", ".download", ".crdownload")
PICKLE_REFUSAL = ("PyTorch pickle weights are never loaded (unpickling can run code); "
                  "use a GGUF or SafeTensors version")
UNSUPPORTED_EXTENSIONS = {
    ".pt": PICKLE_REFUSAL,
    ".pth": PICKLE_REFUSAL,
    ".ckpt": PICKLE_REFUSAL,
    ".onnx": "ONNX models are not supported",
}
_UNSUPPORTED = tuple(UNSUPPORTED_EXTENSIONS)


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class Found:
    """One model file, multi-file model or model folder seen by a scan."""

    path: Path                 # the file (first part of a split set) or the folder
    rel: str                   # path relative to the scanned root ("" for the root itself)
    stem: str                  # the name users know: file name without .gguf or split suffix; folder name
    result: ModelFacts | Skip
    names: tuple[str, ...] = ()  # file names a request may also use
    folder: bool = False       # a model folder (named after its path in a repository), not a file

    def add_to(self, result: DiscoveryResult, source: str, model_id: str = "", *, aliases: Iterable[str] = (),
               owned_by: str = "local", extra: Mapping[str, Any] | None = None) -> None:
        """Append this find to ``result``: a model named ``model_id`` or a skipped file."""
        if isinstance(self.result, ModelFacts):
            result.models.append(self.result.info(model_id or self.stem, source,
                                                  aliases=(*aliases, *self.names), owned_by=owned_by, extra=extra))
        else:
            result.skipped.append(self.result.skipped(self.path, source, name=model_id))


def oserror_skip(exc: OSError) -> Skip:
    return Skip(f"unreadable: {exc.strerror or exc}", UNREADABLE)


def missing_skip(path: Path, exc: OSError) -> Skip:
    """The Skip for a file that ``stat`` refused: a broken link, a missing file, or unreadable."""
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(path):
            return Skip("broken link: its target is missing (incomplete download?)", INCOMPLETE)
        return Skip("no such file", MISSING)
    return oserror_skip(exc)


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """A small JSON file, or ``ValueError`` with a reason (too big, not JSON)."""
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"{path.name} is larger than {limit} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{path.name} is not valid JSON ({type(exc).__name__})") from None


# ------------------------------------------------------------------ the scanner
def stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    """What :meth:`Scanner.cached` compares to tell that a file changed."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


class Scanner:
    """Walks folders, asks the registered formats about what it finds, and caches their header
    reads (it is their :class:`~shimmy_core.contract.model_formats.HeaderCache`).  One per
    source; not shared between threads except through :class:`shimmy_core.catalog.ModelCatalog`,
    which refreshes one source at a time."""

    def __init__(self, formats: Iterable[ModelFormat] = (), max_depth: int = MAX_DEPTH,
                 max_entries: int = MAX_ENTRIES):
        self.formats: tuple[ModelFormat, ...] = tuple(formats)
        self._claims = [(tuple(fmt.suffixes), fmt) for fmt in self.formats]
        self._claimed = tuple(suffix for suffixes, _ in self._claims for suffix in suffixes)
        self.max_depth = max_depth
        self.max_entries = max_entries
        self._cache: dict[tuple, tuple[tuple, Any]] = {}
        self._previous: dict[tuple, tuple[tuple, Any]] = {}
        self.header_reads = 0   # headers actually read (not served from the cache), for tests and benchmarks

    # ---------------------------------------------------------------- cache
    def start_pass(self) -> None:
        """Begin a rescan: entries not used again by the end of this pass are forgotten."""
        self._previous, self._cache = self._cache, {}

    def cached(self, kind: str, path: Path, key: tuple, compute: Callable[[], T]) -> T:
        """``compute()`` for ``path`` unless ``key`` (a stat key) is unchanged since the last time."""
        slot = (kind, str(path))
        hit = self._cache.get(slot) or self._previous.get(slot)
        if hit is not None and hit[0] == key:
            self._cache[slot] = hit
            return hit[1]
        value = compute()
        self._cache[slot] = (key, value)
        return value

    def read_header(self, kind: str, path: Path,
                    read: Callable[[Path, os.stat_result], T | Skip]) -> tuple[os.stat_result, T] | Skip:
        """``path``'s stat and ``read(path, stat)``, read once per version of the file (cached by
        size, mtime and inode; counted in :attr:`header_reads`).  A missing file, a broken link,
        an ``OSError`` or a Skip from ``read`` comes back as that Skip."""
        try:
            st = os.stat(path)
        except OSError as exc:
            return missing_skip(path, exc)

        def compute() -> T | Skip:
            self.header_reads += 1
            try:
                return read(path, st)
            except OSError as exc:
                return oserror_skip(exc)

        header = self.cached(kind, path, stat_key(st), compute)
        return header if isinstance(header, Skip) else (st, header)

    # ---------------------------------------------------------------- one path
    def path(self, path: Path) -> list[Found]:
        """A file or folder someone named (``--model``, ``shimmy add``): one model, or a folder walk."""
        if path.is_dir():
            return self.walk(path)
        name = path.name
        if not path.exists():
            return [Found(path, "", name, Skip("no such file or folder", MISSING))]
        if name.lower().endswith(INCOMPLETE_SUFFIXES):
            return [Found(path, "", name, _incomplete_skip())]
        claim = self._claimant(name.lower())
        for fmt in sorted(self.formats, key=lambda f: f is not claim):
            found = fmt.inspect_path(path, self)
            if found is not None:
                return [Found(found.path, "", found.stem, found.result, found.names)]
        suffix = os.path.splitext(name)[1]
        return [Found(path, "", name, _unrecognized(f"{suffix} files" if suffix else f"the file {name!r}"))]

    def inspect_as(self, format_name: str, path: Path) -> ModelFacts | Skip:
        """A file a source knows the format of (an Ollama blob is GGUF, whatever its name)."""
        fmt = next((f for f in self.formats if f.name == format_name), None)
        found = fmt.inspect_path(path, self) if fmt is not None else None
        return _unrecognized(f"{format_name} files") if found is None else found.result

    def _claimant(self, low: str) -> ModelFormat | None:
        """The format that claims a (lower-case) file name: the first whose suffixes match."""
        if not low.endswith(self._claimed):
            return None
        return next(fmt for suffixes, fmt in self._claims if low.endswith(suffixes))

    # ---------------------------------------------------------------- walking
    def walk(self, root: Path) -> list[Found]:
        """Everything model-like under ``root``, in a stable (sorted) order."""
        out: list[Found] = []
        state = _WalkState(self.max_entries)
        self._walk(root, "", 0, state, out)
        if state.exhausted:
            out.append(Found(root, "", root.name, Skip(
                f"scan stopped after {self.max_entries} entries (folder too large; point Shimmy at "
                "the folder that holds the models)", UNSUPPORTED)))
        return out

    def _walk(self, directory: Path, rel: str, depth: int, state: "_WalkState", out: list[Found]) -> None:
        try:
            st = os.stat(directory)
            if (st.st_dev, st.st_ino) in state.visited:
                return  # a symlink loop, or a folder already seen through another link
            state.visited.add((st.st_dev, st.st_ino))
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if depth == 0 and not isinstance(exc, FileNotFoundError):
                out.append(Found(directory, rel, directory.name, oserror_skip(exc)))
            return
        state.budget -= len(entries)
        if state.budget < 0:
            state.exhausted = True
            return
        files: list[os.DirEntry] = []
        subdirs: list[os.DirEntry] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                (subdirs if entry.is_dir() else files).append(entry)
            except OSError:
                files.append(entry)
        leaf = self._files(directory, rel, files, out)
        if depth < self.max_depth and not leaf:
            for entry in subdirs:
                self._walk(Path(entry.path), _join(rel, entry.name), depth + 1, state, out)

    def _files(self, directory: Path, rel: str, files: list[os.DirEntry], out: list[Found]) -> bool:
        """Ask the formats about one folder and its files; True when the folder is a leaf (a
        model folder whose subfolders are its parts, not models)."""
        names = frozenset(e.name for e in files)
        leaf = False
        owners: list[ModelFormat] = []   # formats that recognized the folder own their files in it
        for fmt in self.formats:
            found = fmt.inspect_folder(directory, names, self)
            if found is not None:
                out.append(_found(found, rel, folder=True))
                owners.append(fmt)
                leaf = leaf or found.leaf
        claimed: dict[str, list[Path]] = {fmt.name: [] for fmt in self.formats}
        found: list[Found] = []
        for entry in files:
            name = entry.name
            low = name.lower()
            fmt = self._claimant(low)
            if fmt is not None:
                if fmt not in owners:
                    claimed[fmt.name].append(Path(entry.path))
            elif low.endswith(INCOMPLETE_SUFFIXES):
                found.append(Found(Path(entry.path), _join(rel, name), name, _incomplete_skip()))
            elif low.endswith(_UNSUPPORTED):
                skip = Skip(UNSUPPORTED_EXTENSIONS[os.path.splitext(low)[1]], UNSUPPORTED)
                found.append(Found(Path(entry.path), _join(rel, name), name, skip))
        for fmt in self.formats:
            if claimed[fmt.name]:
                found.extend(_found(item, rel) for item in fmt.inspect_files(directory, claimed[fmt.name], self))
        if len(found) > 1:
            found.sort(key=lambda f: f.rel)  # by file name (one folder), whichever format answered
        out.extend(found)
        return leaf


@dataclass
class _WalkState:
    budget: int
    visited: set[tuple[int, int]] = field(default_factory=set)
    exhausted: bool = False


def _found(found: Recognized, rel: str, *, folder: bool = False) -> Found:
    """A format's answer, placed in the walk (``rel``: the folder's path relative to the root)."""
    return Found(found.path, rel if folder else _join(rel, found.path.name), found.stem, found.result,
                 found.names, folder)


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _incomplete_skip() -> Skip:
    return Skip("incomplete download (partial file)", INCOMPLETE)


def _unrecognized(what: str) -> Skip:
    return Skip(f"no plugin recognizes {what} (is a format plugin disabled? 'shimmy plugins' lists them)",
                UNSUPPORTED)


# ------------------------------------------------------------------ naming helpers
def repo_names(base: str, found: list[Found], root: str = "") -> dict[int, tuple[str, tuple[str, ...]]]:
    """Names for the models of one repository (a Hugging Face repo, an LM Studio folder...).

    One model: ``base`` (and ``base:stem`` as an alias, so the name survives a second
    download).  Several: ``base:stem`` each (``base:sub/stem`` where stems collide), plus
    ``base:QUANT`` as an alias when that quantization is unique in the repo.  A SafeTensors
    folder at the repository's root (``root``, relative to the scan) is labelled
    ``safetensors``.  Returns ``{index in found: (id, aliases)}`` for the servable entries.
    """
    models = [(i, f, f.result) for i, f in enumerate(found) if isinstance(f.result, ModelFacts)]
    labels = [_label(f, facts, root, nested=False) for _, f, facts in models]
    quants = [facts.quantization for _, _, facts in models]
    names: dict[int, tuple[str, tuple[str, ...]]] = {}
    for (i, f, facts), label, quant in zip(models, labels, quants):
        if labels.count(label) > 1:
            label = _label(f, facts, root, nested=True)
        alias = (f"{base}:{quant}",) if quant and quants.count(quant) == 1 and quant != label else ()
        if len(models) == 1:
            names[i] = (base, (f"{base}:{label}", *alias))
        else:
            names[i] = (f"{base}:{label}", alias)
    return names


def _label(found: Found, facts: ModelFacts, root: str, *, nested: bool) -> str:
    rel = found.rel
    if root and (rel == root or rel.startswith(root + "/")):
        rel = rel[len(root):].lstrip("/")
    if found.folder:
        return rel or facts.format
    if not nested or "/" not in rel:
        return found.stem
    return _join(rel.rsplit("/", 1)[0], found.stem)


def add_all(result: DiscoveryResult, found: Iterable[Found], source: str, owned_by: str = "local") -> None:
    """Add finds named after their files (``model.Q4_K_M.gguf`` -> ``model.Q4_K_M``)."""
    for item in found:
        item.add_to(result, source, owned_by=owned_by)


def add_named(result: DiscoveryResult, found: list[Found], base: str, source: str, *,
              owned_by: str = "local", root: str = "", extra: Mapping[str, Any] | None = None) -> None:
    """Add the finds of one repository-like folder, named with :func:`repo_names`."""
    names = repo_names(base, found, root)
    for index, item in enumerate(found):
        model_id, aliases = names.get(index, (base, ()))
        item.add_to(result, source, model_id, aliases=aliases, owned_by=owned_by, extra=extra)
