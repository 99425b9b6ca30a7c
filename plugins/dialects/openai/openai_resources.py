"""The OpenAI routes: thin Falcon resources that read a body, hand it to the core (through
:class:`~shimmy_core.http.dialect_kit.Generation`) and build OpenAI bodies and streams."""

from __future__ import annotations

import contextlib

import falcon

from shimmy_core.plugin_api import DialectServer, Generation, ModelInfo, parse_json, read_body, send_stream
from shimmy_core.plugin_api import UnsupportedOutputSchema
from shimmy_plugins.dialects.openai.openai_bodies import ResponseBuilder
from shimmy_plugins.dialects.openai.openai_errors import invalid, model_not_found
from shimmy_plugins.dialects.openai.openai_requests import parse_request, unsupported_schema
from shimmy_plugins.dialects.openai.openai_stream import collect, stream


def model_object(info: ModelInfo, unavailable: str | None = None) -> dict:
    """An OpenAI Model object plus Shimmy's extra metadata fields; ``available`` is false
    (with the reason, e.g. the pip command to run) when no usable backend can serve it."""
    body = {"id": info.id, "object": "model", "created": info.created, "owned_by": info.owned_by,
            "available": unavailable is None, "unavailable_reason": unavailable}
    body.update(
        {
            "context_window": info.context_length,
            "kind": info.kind,
            "format": info.format,
            "architecture": info.architecture,
            "quantization": info.quantization,
            "parameters": info.parameters,
            "size_bytes": info.size_bytes,
            "source": info.source,
        }
    )
    return body


class ModelsResource:
    """``GET /v1/models`` and ``GET /v1/models/{id}``."""

    def __init__(self, server: DialectServer):
        self.catalog = server.catalog
        self.manager = server.manager

    def _object(self, info: ModelInfo) -> dict:
        return model_object(info, self.manager.unavailable_reason(info))

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"object": "list", "data": [self._object(m) for m in self.catalog.list()]}

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        info = self.catalog.get(model_id)
        if info is None:
            raise model_not_found(model_id)
        resp.media = self._object(info)


class GenerationResource:
    """``POST /v1/chat/completions`` (kind "chat") and ``POST /v1/completions`` (kind "completion")."""

    def __init__(self, kind: str, server: DialectServer):
        self.kind = kind
        self.settings = server.settings
        self.generation = Generation(kind, server)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = parse_json(read_body(req, self.settings.max_body_bytes))
        parsed = parse_request(self.kind, body, self.settings.max_n, self.settings.sampling_defaults())
        req.context.model = parsed.model
        if self.kind == "chat" and len(body["messages"]) > self.settings.max_messages:
            raise invalid(f"Too many messages: {len(body['messages'])}; this server accepts at most "
                          f"{self.settings.max_messages} (SHIMMY_MAX_MESSAGES).", param="messages",
                          code="too_many_messages")
        try:
            model_id, events = self.generation.begin(req, parsed, body)
        except UnsupportedOutputSchema as exc:
            raise unsupported_schema(exc, body) from None
        builder = ResponseBuilder(self.kind, model_id, parsed.prompts[0].params.logprobs)
        if not parsed.stream:
            with contextlib.closing(events):
                resp.media = collect(builder, events)
            return
        send_stream(resp, stream(builder, events, parsed.include_usage, on_close=events.close))


class ToolsResource:
    """``GET /v1/tools``: the registered tools, their schemas and whether the server runs them."""

    def __init__(self, server: DialectServer):
        self.tools = server.tools

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"object": "list", "data": self.tools.listing()}
