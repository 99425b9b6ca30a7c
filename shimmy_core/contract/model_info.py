"""What a plugin says about a model: the description of a servable model, the files a
discovery source skipped and why, and the protocol of a discovery source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# What a model is for (``ModelInfo.kind``): a chat model generates text; an embedding model turns
# texts into vectors (``embed``); a rerank model scores documents against a query (``rerank``).
CHAT = "chat"
EMBEDDING_KIND = "embedding"
RERANK = "rerank"
MODEL_KINDS = (CHAT, EMBEDDING_KIND, RERANK)


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
    kind: str = CHAT                     # what it is for: one of MODEL_KINDS
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class SkippedFile:
    """A file a source saw but will not serve, and why.

    ``category`` groups reasons (``adapter``, ``projector``, ``incomplete``...; see
    :mod:`shimmy_core.discovery`); ``name`` is the name the source would have used, if any.
    """

    path: str
    reason: str
    source: str = ""
    category: str = ""
    name: str = ""


@dataclass
class DiscoveryResult:
    models: list[ModelInfo] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)


@runtime_checkable
class DiscoverySource(Protocol):
    """A place to look for models.  An optional ``priority`` (int, lower first, default
    ``DEFAULT_PRIORITY``) decides who keeps a bare name that two sources both use."""

    name: str

    def discover(self) -> DiscoveryResult:
        """Look for models now; must be fast and must not load any model."""


DEFAULT_PRIORITY = 60
