"""GGUF embedding and rerank models: a llama.cpp context with ``embeddings`` on, separate from
any chat engine, its pooling taken from the model's header (mean, CLS, last token) or rank
pooling for a reranker (a classifier head on the pooled token).

A request's inputs are packed into as few decodes as fit: each input is its own sequence of
one batch (up to ``n_seq_max`` sequences and ``n_batch`` tokens), and llama.cpp pools each
sequence apart.  Pooled vectors are scaled to unit length, as llama-server does (the
sentence-transformers models converted to GGUF are trained for cosine similarity); rerank
scores are the classifier's raw output.

llama_cpp is imported by :func:`load_embedding_model` only, when such a model loads.
"""

from __future__ import annotations

import math
import threading
from typing import Sequence

from shimmy_core.plugin_api import EmbeddingInput, Embeddings, InputTokens, ModelLoadError, RERANK, RerankScores

MAX_SEQUENCES = 64        # inputs decoded together (llama.cpp's n_seq_max)
# Tokens decoded together (at least one whole input).  An encoder's micro-batch attends over all
# of its tokens, masked per sequence, so its attention grows with the square of this: 512 keeps
# that near a fifth of MiniLM's work while packing 16 inputs of 32 tokens per decode (measured
# on a loaded machine only: docs/performance.md#embeddings).
MIN_BATCH_TOKENS = 512


def load_embedding_model(model, settings, lmodel, engine_threads) -> "GGUFEmbeddingModel":
    """A context for ``lmodel`` (already loaded) that pools; ``model.kind`` says embed or rerank."""
    import llama_cpp
    from llama_cpp._internals import LlamaBatch, LlamaContext

    train = lmodel.n_ctx_train() or 512
    context = min(model.context_length or train, train)
    if settings.ctx_size:
        context = min(context, settings.ctx_size)
    tokens = max(context, min(MIN_BATCH_TOKENS, context * MAX_SEQUENCES))
    cparams = llama_cpp.llama_context_default_params()
    cparams.embeddings = True
    # A non-causal encoder (BERT) keeps no cache: its context is one input, and a micro-batch
    # holds whole inputs.  A decoder (Qwen3 embeddings) needs room for every token of a batch.
    encoder = not _causal(lmodel)
    cparams.n_ctx = context if encoder else tokens
    cparams.n_batch = cparams.n_ubatch = tokens
    cparams.n_seq_max = MAX_SEQUENCES
    cparams.kv_unified = True
    threads, batch_threads = engine_threads(settings.threads, settings.threads_batch)
    cparams.n_threads, cparams.n_threads_batch = threads, batch_threads
    cparams.no_perf = True
    if model.kind == RERANK:
        cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_RANK
    elif model.extra.get("pooling_type") in (None, llama_cpp.LLAMA_POOLING_TYPE_NONE):
        cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN  # the header names none: mean, as sentence-transformers
    try:
        ctx = LlamaContext(model=lmodel, params=cparams, verbose=False)
    except ValueError as exc:
        lmodel.close()
        raise ModelLoadError(f"could not create an embedding context for {model.id!r}: {exc}") from exc
    batch = LlamaBatch(n_tokens=tokens, embd=0, n_seq_max=MAX_SEQUENCES, verbose=False)
    outputs = llama_cpp.llama_model_n_cls_out(lmodel.model) if model.kind == RERANK else lmodel.n_embd()
    matryoshka = tuple(model.extra.get("matryoshka_dimensions") or ())
    return GGUFEmbeddingModel(lmodel, ctx, batch, context, outputs, matryoshka)


def _causal(lmodel) -> bool:
    """Whether the model attends causally (a decoder), from its header (``{arch}.attention.causal``)."""
    meta = lmodel.metadata()
    arch = meta.get("general.architecture", "")
    return meta.get(f"{arch}.attention.causal", "true").lower() != "false"


class GGUFEmbeddingModel:
    """A loaded GGUF embedding (or rerank) model; one request's decodes at a time."""

    def __init__(self, lmodel, ctx, batch, context_length: int, outputs: int, matryoshka: tuple[int, ...]):
        self._model = lmodel
        self._ctx = ctx
        self._batch = batch
        self._lock = threading.Lock()
        self.context_length = context_length
        self.dimensions = outputs
        self.normalized = True
        self.matryoshka_dimensions = tuple(d for d in matryoshka if d < outputs)
        self._batch_tokens = batch._n_tokens
        sep, eos = lmodel.token_sep(), lmodel.token_eos()
        closing = sep if sep >= 0 else eos if eos >= 0 else None
        self._bos = lmodel.token_bos()
        self._inputs = InputTokens(self._tokens, lmodel.n_vocab(), context_length, closing)

    def _tokens(self, text: str) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    # ------------------------------------------------------------ running
    def _pooled(self, sequences: list[list[int]], normalize: bool) -> list[list[float]]:
        """One pooled output per sequence, decoded in as few batches as fit."""
        out: list[list[float]] = []
        start = 0
        with self._lock:
            while start < len(sequences):
                used, end = 0, start
                self._batch.reset()
                while end < len(sequences) and end - start < MAX_SEQUENCES and \
                        used + len(sequences[end]) <= self._batch_tokens:
                    self._batch.add_sequence(sequences[end], end - start, True)
                    used += len(sequences[end])
                    end += 1
                self._ctx.kv_cache_clear()
                self._ctx.decode(self._batch)
                for seq in range(end - start):
                    row = self._ctx.get_embeddings_seq(seq)[: self.dimensions]
                    out.append(_unit(row) if normalize else [float(x) for x in row])
                start = end
        return out

    def embed(self, inputs: Sequence[EmbeddingInput], truncate: bool = False) -> Embeddings:
        sequences = [self._inputs.of(item, truncate, i) for i, item in enumerate(inputs)]
        return Embeddings(self._pooled(sequences, normalize=True), sum(len(s) for s in sequences))

    def rerank(self, query: str, documents: Sequence[str], truncate: bool = False) -> RerankScores:
        """Each pair as the model's tokenizer joins two texts: ``[CLS] query [SEP] document [SEP]``."""
        head = self._tokens(query)
        pairs = []
        for i, document in enumerate(documents):
            tail = self._tokens(document)
            if tail and tail[0] == self._bos:
                tail = tail[1:]
            pair = head + tail
            if len(pair) > self.context_length and truncate and len(head) < self.context_length - 1:
                pair = head + tail[: self.context_length - len(head) - 1] + tail[-1:]  # shorten the document
            pairs.append(self._inputs.fit(pair, truncate, i, "documents"))
        scores = [row[0] for row in self._pooled(pairs, normalize=False)]
        return RerankScores(scores, sum(len(p) for p in pairs))

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        self._batch.close()
        self._ctx.close()
        self._model.close()


def _unit(row) -> list[float]:
    values = [float(x) for x in row]
    norm = math.sqrt(sum(x * x for x in values))
    return [x / norm for x in values] if norm > 0 else values
