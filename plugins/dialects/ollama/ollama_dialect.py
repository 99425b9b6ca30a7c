"""The Ollama API dialect: ``/api/chat``, ``/api/generate``, ``/api/embed`` (and the older
``/api/embeddings``), ``/api/tags``, ``/api/show``, ``/api/ps`` and ``/api/version``, with Ollama's
bodies, NDJSON streams and ``{"error": ...}`` envelope.  The routes of Ollama's model store
(pull, push, create, copy, delete) answer with an error that says what to do instead.
See docs/ollama.md."""

from __future__ import annotations

from shimmy_core.plugin_api import DialectServer, hookimpl
from shimmy_plugins.dialects.ollama import ollama_resources as resources
from shimmy_plugins.dialects.ollama.ollama_errors import error_response


class OllamaDialect:
    """Registered as ``ollama_api``: the name ``ollama`` is the discovery source of Ollama's store."""

    name = "ollama_api"
    prefixes = ("/api",)

    def add_routes(self, routes, server: DialectServer) -> None:
        generating = {"/api/chat": resources.GenerateResource(True, server),
                      "/api/generate": resources.GenerateResource(False, server)}
        plain = {"/api/version": resources.VersionResource(), "/api/tags": resources.TagsResource(server),
                 "/api/show": resources.ShowResource(server), "/api/ps": resources.PsResource(server),
                 "/api/embed": resources.EmbedResource(False, server),
                 "/api/embeddings": resources.EmbedResource(True, server)}
        plain.update({path: resources.RefusedResource(why) for path, why in resources.STORE_ROUTES.items()})
        for path, resource in generating.items():
            routes.add(path, resource, generation=True)
        for path, resource in plain.items():
            routes.add(path, resource)

    def error_response(self, exc: BaseException):
        return error_response(exc)


@hookimpl
def shimmy_register_dialects(register):
    register(OllamaDialect())
