"""The Anthropic dialect: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens`` with
Anthropic's Message object, its event stream and its error envelope, so that the anthropic SDKs and
Claude Code (``ANTHROPIC_BASE_URL``) work against Shimmy.  ``/v1/models`` stays the OpenAI
dialect's; Anthropic model names reach local models through ``--model-alias``."""

from __future__ import annotations

from shimmy_core.plugin_api import DialectServer, hookimpl
from shimmy_plugins.dialects.anthropic.anthropic_errors import error_response
from shimmy_plugins.dialects.anthropic.anthropic_resources import CountTokensResource, MessagesResource


class AnthropicDialect:
    name = "anthropic"
    prefixes = ("/v1/messages",)

    def add_routes(self, routes, server: DialectServer) -> None:
        routes.add("/v1/messages", MessagesResource(server), generation=True)
        routes.add("/v1/messages/count_tokens", CountTokensResource(server))

    def error_response(self, exc: BaseException):
        return error_response(exc)


@hookimpl
def shimmy_register_dialects(register):
    register(AnthropicDialect())
