"""What a model-format plugin says about files and folders: the protocol of a format
recognizer (:class:`ModelFormat`, registered through ``shimmy_register_formats``), the
header cache it reads through (:class:`HeaderCache`, which Shimmy's scanner implements),
and what it answers: a servable model's :class:`ModelFacts` or the :class:`Skip` that says
why not, wrapped in a :class:`Recognized`.

The core knows no model format: GGUF and SafeTensors are recognized by their backend
plugins, and a new format arrives as a plugin that implements this protocol.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import AbstractSet, Any, Callable, Iterable, Mapping, Protocol, Sequence, TypeVar, runtime_checkable

from shimmy_core.contract.model_info import CHAT, ModelInfo, SkippedFile

T = TypeVar("T")


@dataclass(frozen=True)
class Skip:
    """Why something will not be served; ``category`` groups reasons (see :mod:`shimmy_core.discovery`)."""

    reason: str
    category: str

    def skipped(self, path: str | Path, source: str, name: str = "") -> SkippedFile:
        return SkippedFile(str(path), self.reason, source, category=self.category, name=name)


@dataclass(frozen=True)
class ModelFacts:
    """A servable model, described from its headers; :meth:`info` names it."""

    path: str
    format: str
    size_bytes: int
    created: int
    context_length: int | None = None
    architecture: str | None = None
    quantization: str | None = None
    parameters: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    kind: str = CHAT                 # what the model is for (see shimmy_core.contract.model_info.MODEL_KINDS)

    def info(self, model_id: str, source: str, *, aliases: Iterable[str] = (), owned_by: str = "local",
             extra: Mapping[str, Any] | None = None) -> ModelInfo:
        names = tuple(dict.fromkeys(a for a in aliases if a and a != model_id))
        return ModelInfo(
            id=model_id, path=self.path, format=self.format, source=source, created=self.created,
            owned_by=owned_by, size_bytes=self.size_bytes, context_length=self.context_length,
            architecture=self.architecture, quantization=self.quantization, parameters=self.parameters,
            aliases=names, kind=self.kind, extra={**self.extra, **(extra or {})},
        )


@dataclass(frozen=True)
class Recognized:
    """One model (or one thing that is not served) a format recognized."""

    path: Path                       # the file (the first of a multi-file model) or the folder
    result: ModelFacts | Skip
    stem: str                        # the name users know: ``model.Q4_K_M`` for ``model.Q4_K_M.gguf``
    names: tuple[str, ...] = ()      # other names a request may use (the file name...)
    leaf: bool = False               # a folder: the walk does not look into its subfolders


class HeaderCache(Protocol):
    """Header reads that a rescan of an unchanged file does not repeat (Shimmy's ``Scanner``)."""

    def cached(self, kind: str, path: Path, key: tuple, compute: Callable[[], T]) -> T:
        """``compute()`` for ``path`` unless ``key`` (a stat key) is unchanged since the last scan."""

    def read_header(self, kind: str, path: Path,
                    read: Callable[[Path, os.stat_result], T | Skip]) -> tuple[os.stat_result, T] | Skip:
        """``path``'s stat and ``read(path, stat)``, read once per version of the file and counted
        as a header read; a missing file, a broken link, an ``OSError`` or a Skip from ``read``
        comes back as that Skip."""


@runtime_checkable
class ModelFormat(Protocol):
    """Recognizes the files or folders of one model format (``ModelInfo.format`` = ``name``).

    Discovery walks folders and asks the formats; everything a format knows (headers, names,
    multi-file models, what is not a language model) stays in its plugin.  Every method
    returns quickly, reads headers only (through ``headers``, so that rescans are cheap) and
    never loads a model.
    """

    name: str                         # the format of the models it describes ("gguf")
    suffixes: tuple[str, ...]         # lower-case file-name endings it claims in a walk (".gguf")

    def inspect_folder(self, folder: Path, names: AbstractSet[str], headers: HeaderCache) -> Recognized | None:
        """A folder of the walk (``names``: its files): a model folder of this format (or a
        folder to skip, with a reason), or ``None``.  The files of the format's own suffixes in
        a folder it recognized are not passed to :meth:`inspect_files`."""

    def inspect_files(self, folder: Path, files: Sequence[Path], headers: HeaderCache) -> Iterable[Recognized]:
        """The files of one folder whose names end with one of ``suffixes`` (sorted by name):
        one :class:`Recognized` for each model, each multi-file model (at its first file) and
        each file to skip."""

    def inspect_path(self, path: Path, headers: HeaderCache) -> Recognized | None:
        """A file named by a user or a source (``--model``, ``shimmy add``, an Ollama blob),
        whatever its name; ``None`` when it is not of this format.  Formats that claim its
        suffix are asked first."""
