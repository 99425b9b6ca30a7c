"""Embeddings and reranking, for every dialect: resolve the model, check that it is the kind the
request needs, admit the request (one at a time per model, the others queued), run it, and
return neutral results.  A dialect validates its own body, calls :meth:`EmbeddingService.embed`
or :meth:`EmbeddingService.rerank`, and writes what comes back in its own shape (OpenAI's
``/v1/embeddings`` and ``/v1/rerank``; Ollama's ``/api/embed`` the same way).

Errors are neutral: :class:`~shimmy_core.contract.generation.ModelNotFound`,
:class:`~shimmy_core.contract.embedding.WrongModelKind` and other
:class:`~shimmy_core.contract.generation.InvalidRequest` (400), ``Overloaded`` (503).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

from shimmy_core.admission import Turnstile
from shimmy_core.catalog import ModelCatalog, ModelManager
from shimmy_core.contract.embedding import EmbeddingInput, WrongModelKind
from shimmy_core.contract.generation import InvalidRequest, Overloaded
from shimmy_core.contract.model_info import EMBEDDING_KIND, RERANK, ModelInfo
from shimmy_core.contract.settings import Settings
from shimmy_core.lifecycle import Lifecycle, ShuttingDown


@dataclass(frozen=True)
class EmbeddingResult:
    model: str                       # the model's id (the name the request used may be an alias)
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True)
class RerankResult:
    model: str
    scores: list[float]              # one per document, in the documents' order
    prompt_tokens: int


def shorten(vectors: list[list[float]], dimensions: int) -> list[list[float]]:
    """Each vector's first ``dimensions`` values, scaled back to unit length (Matryoshka)."""
    out = []
    for vector in vectors:
        cut = vector[:dimensions]
        norm = math.sqrt(sum(x * x for x in cut))
        out.append([x / norm for x in cut] if norm > 0 else cut)
    return out


@dataclass
class EmbeddingService:
    catalog: ModelCatalog
    manager: ModelManager
    settings: Settings
    lifecycle: Lifecycle | None = None
    _gates: dict[str, Turnstile] = field(default_factory=dict, init=False, repr=False)
    _gates_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def embed(self, model_id: str, inputs: Sequence[EmbeddingInput], *, truncate: bool = False,
              dimensions: int | None = None, cancelled: Callable[[], bool] = lambda: False) -> EmbeddingResult:
        """Vectors for ``inputs`` (texts, or lists of token ids).  ``dimensions``: shorter vectors,
        for a model trained for it (Matryoshka), else :class:`InvalidRequest`."""
        if not inputs:
            raise InvalidRequest("The input must not be empty.", param="input", code="empty_input")
        info = self.catalog.resolve(model_id, EMBEDDING_KIND)
        model = self.manager.get(info)
        if not callable(getattr(model, "embed", None)):
            raise WrongModelKind(info.id, "chat", EMBEDDING_KIND)  # a backend that cannot embed
        native = int(model.dimensions)
        if dimensions is not None and dimensions != native:
            allowed = tuple(getattr(model, "matryoshka_dimensions", ()) or ())
            if not allowed:
                raise InvalidRequest(
                    f"The model {info.id!r} makes {native}-dimensional vectors and was not trained to be "
                    f"shortened (Matryoshka); leave out dimensions or ask for {native}.",
                    param="dimensions", code="dimensions_not_supported")
            if not 1 <= dimensions < native:
                raise InvalidRequest(f"dimensions must be between 1 and {native} for the model {info.id!r}.",
                                     param="dimensions", code="dimensions_not_supported")
        result = self._admitted(info, cancelled, lambda: model.embed(list(inputs), truncate))
        vectors = result.vectors
        if dimensions is not None and dimensions != native:
            vectors = shorten(vectors, dimensions)
        return EmbeddingResult(info.id, vectors, result.prompt_tokens)

    def rerank(self, model_id: str, query: str, documents: Sequence[str], *, truncate: bool = False,
               cancelled: Callable[[], bool] = lambda: False) -> RerankResult:
        """A relevance score for each document against ``query``."""
        if not documents:
            raise InvalidRequest("documents must not be empty.", param="documents", code="empty_input")
        info = self.catalog.resolve(model_id, RERANK)
        model = self.manager.get(info)
        if not callable(getattr(model, "rerank", None)):
            raise WrongModelKind(info.id, "chat", RERANK)
        result = self._admitted(info, cancelled, lambda: model.rerank(query, list(documents), truncate))
        return RerankResult(info.id, list(result.scores), result.prompt_tokens)

    def _admitted(self, info: ModelInfo, cancelled: Callable[[], bool], work):
        """Run ``work`` once the model's turnstile lets the request in (one request at a time
        per model: the model batches a request's inputs itself)."""
        lifecycle = self.lifecycle
        if lifecycle is not None and lifecycle.draining:
            raise ShuttingDown()
        with self._gates_lock:
            gate = self._gates.get(info.path)
            if gate is None:
                gate = self._gates[info.path] = Turnstile(1, self.settings.queue_size, self.settings.queue_timeout)
        if not gate.enter(lambda: cancelled() or (lifecycle is not None and lifecycle.draining)):
            if lifecycle is not None and lifecycle.draining:
                raise ShuttingDown()
            raise Overloaded("The client went away while the request waited for a slot.")
        try:
            return work()
        finally:
            gate.leave()
