"""The neutral contract of embedding and rerank models.

A backend that loads a model of kind ``embedding`` (``ModelInfo.kind``) returns a loaded model
that also implements :class:`EmbeddingModel`; one of kind ``rerank`` implements
:class:`RerankModel`.  The core's embedding service (``shimmy_core.embedding_service``) resolves
the model, checks its kind, admits the request and hands the model plain inputs: texts or lists
of token ids, never HTTP or a dialect's JSON.  What the vectors become on the wire (floats,
base64, fewer dimensions) is the service's and the dialect's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, Union, runtime_checkable

from shimmy_core.contract.generation import InvalidRequest

# One input: a text, or token ids of the model's own vocabulary (used as given: no special
# tokens are added to them).
EmbeddingInput = Union[str, Sequence[int]]


class WrongModelKind(InvalidRequest):
    """A model asked for what it is not for (a chat model for embeddings, an embedding model
    to chat...): a client mistake (400 in every dialect).  ``kind`` is what the model is,
    ``wanted`` what the request needs."""

    def __init__(self, model: str, kind: str, wanted: str):
        doing = {"chat": "generate text", "embedding": "make embeddings", "rerank": "rerank documents"}
        super().__init__(f"The model {model!r} is a{'n' if kind[:1] in 'aeiou' else ''} {kind} model: it cannot "
                         f"{doing.get(wanted, wanted)}; use a{'n' if wanted[:1] in 'aeiou' else ''} {wanted} model.",
                         param="model", code="wrong_model_kind")
        self.model = model
        self.kind = kind
        self.wanted = wanted


@dataclass(frozen=True)
class Embeddings:
    """What :meth:`EmbeddingModel.embed` returns: one vector per input, in order, and the tokens
    the inputs took (after truncation)."""

    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True)
class RerankScores:
    """What :meth:`RerankModel.rerank` returns: one score per document, in the documents' order
    (higher: more relevant; the model's raw score, not a probability), and the tokens read."""

    scores: list[float]
    prompt_tokens: int


@runtime_checkable
class EmbeddingModel(Protocol):
    """A loaded embedding model (``ModelInfo.kind == "embedding"``)."""

    context_length: int              # most tokens one input may have
    dimensions: int                  # the length of its vectors
    normalized: bool                 # its vectors have unit length (cosine = dot product)
    # Smaller sizes the model was trained to be cut to (Matryoshka); empty: its vectors must not
    # be shortened.  The service cuts and renormalizes; the model always returns full vectors.
    matryoshka_dimensions: tuple[int, ...]

    def embed(self, inputs: Sequence[EmbeddingInput], truncate: bool = False) -> Embeddings:
        """Embed every input, batching as the backend sees fit.  An input longer than
        ``context_length`` raises ``ContextLengthExceeded`` (param ``input``) unless
        ``truncate``, which keeps its first tokens (and the model's closing special token);
        a token id outside the vocabulary raises :class:`InvalidRequest`."""

    def close(self) -> None:
        """Free the model's memory."""


@runtime_checkable
class RerankModel(Protocol):
    """A loaded rerank model, a cross-encoder (``ModelInfo.kind == "rerank"``)."""

    context_length: int              # most tokens of one query and document pair

    def rerank(self, query: str, documents: Sequence[str], truncate: bool = False) -> RerankScores:
        """Score each document against ``query``; a pair over ``context_length`` raises
        ``ContextLengthExceeded`` (param ``documents``) unless ``truncate``, which shortens the
        document."""

    def close(self) -> None:
        """Free the model's memory."""
