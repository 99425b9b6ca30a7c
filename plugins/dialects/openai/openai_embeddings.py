"""``POST /v1/embeddings`` as OpenAI documents it, and ``POST /v1/rerank`` (also ``/rerank``) in
llama-server's, Jina's and Cohere's shape: thin resources over the core's neutral
:class:`~shimmy_core.embedding_service.EmbeddingService`."""

from __future__ import annotations

import base64
import struct
import uuid

import falcon

from shimmy_core.plugin_api import DialectServer, EmbeddingService, parse_json, read_body
from shimmy_plugins.dialects.openai.openai_requests import parse_embedding_request, parse_rerank_request


def encode_base64(vector: list[float]) -> str:
    """A vector as OpenAI's ``encoding_format: base64``: little-endian float32, base64-encoded."""
    packed = struct.pack(f"<{len(vector)}f", *vector)
    return base64.b64encode(packed).decode("ascii")


def embedding_body(model: str, vectors: list[list[float]], prompt_tokens: int, as_base64: bool) -> dict:
    data = [{"object": "embedding", "index": i, "embedding": encode_base64(v) if as_base64 else v}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def rerank_body(model: str, scores: list[float], documents: list[str], prompt_tokens: int, top_n: int | None,
                return_documents: bool) -> dict:
    """Results sorted by ``relevance_score``, best first (ties keep the documents' order)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: top_n or len(scores)]
    results = []
    for i in order:
        result: dict = {"index": i, "relevance_score": scores[i]}
        if return_documents:
            result["document"] = {"text": documents[i]}
        results.append(result)
    return {"id": f"rerank-{uuid.uuid4().hex}", "object": "list", "model": model, "results": results,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def _cancelled(req: falcon.Request):
    return req.env.get("waitress.client_disconnected") or (lambda: False)


def _service(server: DialectServer) -> EmbeddingService:
    if server.embeddings is None:  # a server built without one: the route is not there
        raise falcon.HTTPNotFound()
    return server.embeddings


class _ServiceRoute:
    """A route over the embedding service: read and validate the body (``parse``), run it
    (``run``), note the model and the tokens for the access log and metrics, answer (``answer``)."""

    def __init__(self, server: DialectServer):
        self.server = server

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        parsed = self.parse(parse_json(read_body(req, self.server.settings.max_body_bytes)))
        req.context.model = parsed.model
        result = self.run(_service(self.server), parsed, _cancelled(req))
        req.context.model = result.model
        req.context.usage = (result.prompt_tokens, 0)
        resp.media = self.answer(parsed, result)


class EmbeddingsResource(_ServiceRoute):
    """``POST /v1/embeddings``."""

    parse = staticmethod(parse_embedding_request)

    def run(self, service: EmbeddingService, parsed, cancelled):
        return service.embed(parsed.model, parsed.inputs, truncate=parsed.truncate, dimensions=parsed.dimensions,
                             cancelled=cancelled)

    def answer(self, parsed, result) -> dict:
        return embedding_body(result.model, result.vectors, result.prompt_tokens, parsed.base64)


class RerankResource(_ServiceRoute):
    """``POST /v1/rerank`` and ``POST /rerank``."""

    parse = staticmethod(parse_rerank_request)

    def run(self, service: EmbeddingService, parsed, cancelled):
        return service.rerank(parsed.model, parsed.query, parsed.documents, truncate=parsed.truncate,
                              cancelled=cancelled)

    def answer(self, parsed, result) -> dict:
        return rerank_body(result.model, result.scores, parsed.documents, result.prompt_tokens, parsed.top_n,
                           parsed.return_documents)
