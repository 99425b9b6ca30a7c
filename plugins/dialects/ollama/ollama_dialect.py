"""The Ollama API dialect: ``/api/chat``, ``/api/generate``, ``/api/embed`` (and the older
``/api/embeddings``), ``/api/tags``, ``/api/show``, ``/api/ps`` and ``/api/version``, with Ollama's
bodies, NDJSON streams and ``{"error": ...}`` envelope.  The routes of Ollama's model store
(pull, push, create, copy, delete) answer with an error that says what to do instead.
See docs/ollama.md."""

from __future__ import annotations

from shimmy_core.plugin_api import DialectServer, hookimpl
from shimmy_plugins.dialects.ollama.ollama_errors import error_response
from shimmy_plugins.dialects.ollama.ollama_resources import (
    EmbedResource,
    GenerateResource,
    PsResource,
    RefusedResource,
    ShowResource,
    STORE_ROUTES,
    TagsResource,
    VersionResource,
)


class OllamaDialect:
    name = "ollama_api"
    prefixes = ("/api",)

    def add_routes(self, routes, server: DialectServer) -> None:
        routes.add("/api/version", VersionResource())
        routes.add("/api/tags", TagsResource(server))
        routes.add("/api/show", ShowResource(server))
        routes.add("/api/ps", PsResource(server))
        routes.add("/api/chat", GenerateResource(True, server), generation=True)
        routes.add("/api/generate", GenerateResource(False, server), generation=True)
        routes.add("/api/embed", EmbedResource(False, server))
        routes.add("/api/embeddings", EmbedResource(True, server))
        for path, message in STORE_ROUTES.items():
            routes.add(path, RefusedResource(message))

    def error_response(self, exc: BaseException):
        return error_response(exc)


@hookimpl
def shimmy_register_dialects(register):
    register(OllamaDialect())
