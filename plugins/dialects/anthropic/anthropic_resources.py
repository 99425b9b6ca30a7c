"""The Messages routes: thin Falcon resources that read a body, hand it to the core (through
``Generation``) and build Anthropic's Message or its stream."""

from __future__ import annotations

import contextlib

import falcon

from shimmy_core.plugin_api import DialectServer, Generation, parse_json, read_body, send_stream
from shimmy_plugins.dialects.anthropic.anthropic_errors import invalid
from shimmy_plugins.dialects.anthropic.anthropic_messages import MessageBuilder
from shimmy_plugins.dialects.anthropic.anthropic_requests import parse_request
from shimmy_plugins.dialects.anthropic.anthropic_stream import collect, stream


def _body(req: falcon.Request, server: DialectServer) -> dict:
    body = parse_json(read_body(req, server.settings.max_body_bytes))
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > server.settings.max_messages:
        raise invalid(f"messages: {len(messages)} messages; this server accepts at most "
                      f"{server.settings.max_messages} (SHIMMY_MAX_MESSAGES).")
    return body


class MessagesResource:
    """``POST /v1/messages``."""

    def __init__(self, server: DialectServer):
        self.server = server
        self.generation = Generation("messages", server)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = _body(req, self.server)
        parsed = parse_request(body, self.server.settings.max_tokens_ceiling, defaults=self.server.settings.sampling_defaults())
        req.context.model = parsed.model
        model_id, events = self.generation.begin(req, parsed, body)
        builder = MessageBuilder(model_id, parsed.prompts[0].params.stop)
        if not parsed.stream:
            with contextlib.closing(events):
                resp.media = collect(builder, events)
            return
        send_stream(resp, stream(builder, events))


class CountTokensResource:
    """``POST /v1/messages/count_tokens``: the prompt's tokens as the model would read them."""

    def __init__(self, server: DialectServer):
        self.server = server

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = _body(req, self.server)
        parsed = parse_request(body, self.server.settings.max_tokens_ceiling, counting=True)
        req.context.model = parsed.model
        resp.media = {"input_tokens": self.server.service.count_tokens(parsed)}
