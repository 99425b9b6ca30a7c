"""The OpenAI dialect: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
``/v1/models``, the rerank routes of llama-server and Jina (``/v1/rerank``, ``/rerank``) and
Shimmy's ``/v1/tools``, with OpenAI's bodies, SSE chunks and error envelope.

It also answers the errors of paths no other dialect claims (its prefix is ``/``): Shimmy is an
OpenAI-compatible server first, and OpenAI's envelope is what most clients parse.
"""

from __future__ import annotations

from shimmy_core.plugin_api import DialectServer, hookimpl
from shimmy_plugins.dialects.openai.openai_embeddings import EmbeddingsResource, RerankResource
from shimmy_plugins.dialects.openai.openai_errors import error_response
from shimmy_plugins.dialects.openai.openai_resources import GenerationResource, ModelsResource, ToolsResource


class OpenAIDialect:
    name = "openai"
    prefixes = ("/",)

    def add_routes(self, routes, server: DialectServer) -> None:
        models = ModelsResource(server)
        routes.add("/v1/models", models)
        routes.add("/v1/models/{model_id:path}", models, suffix="one")
        routes.add("/v1/tools", ToolsResource(server))
        routes.add("/v1/chat/completions", GenerationResource("chat", server), generation=True)
        routes.add("/v1/completions", GenerationResource("completion", server), generation=True)
        routes.add("/v1/embeddings", EmbeddingsResource(server))
        rerank = RerankResource(server)
        routes.add("/v1/rerank", rerank)
        routes.add("/rerank", rerank)

    def error_response(self, exc: BaseException):
        return error_response(exc)


@hookimpl
def shimmy_register_dialects(register):
    register(OpenAIDialect())
