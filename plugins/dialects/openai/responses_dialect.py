"""The OpenAI Responses API (``/v1/responses``), as a second dialect of the OpenAI package.

It lives beside the chat/completions dialect because it is the same vendor's API: the same
error envelope (``openai_errors``), the same JSON body checks and tool-field rules
(``openai_requests``), the same SSE writer (``openai_stream``).  It is its own plugin
(entry point ``openai_responses``), so ``--disable-plugin openai_responses`` turns it off
alone, and it keeps its stored responses (``responses_store``) to itself.
"""

from __future__ import annotations

from shimmy_core.plugin_api import DialectServer, hookimpl
from shimmy_plugins.dialects.openai.openai_errors import error_response
from shimmy_plugins.dialects.openai.responses_resources import (
    InputTokensResource,
    ResponsesResource,
    StoredResponseResource,
)
from shimmy_plugins.dialects.openai.responses_store import ResponseStore


class OpenAIResponsesDialect:
    name = "openai_responses"
    prefixes = ("/v1/responses",)

    def add_routes(self, routes, server: DialectServer) -> None:
        store = ResponseStore.from_settings(server.settings)   # one per server, in memory only
        stored = StoredResponseResource(store)
        routes.add("/v1/responses", ResponsesResource(server, store), generation=True)
        routes.add("/v1/responses/input_tokens", InputTokensResource(server, store))
        routes.add("/v1/responses/{response_id}", stored)
        routes.add("/v1/responses/{response_id}/input_items", stored, suffix="items")

    def error_response(self, exc: BaseException):
        return error_response(exc)


@hookimpl
def shimmy_register_dialects(register):
    register(OpenAIResponsesDialect())
