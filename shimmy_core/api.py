"""Falcon resources: thin classes that read a body, call the service and hand
the result to the ``openai_api`` builders."""

from __future__ import annotations

import contextlib


import falcon

from shimmy_core import __version__
from shimmy_core.models import ModelCatalog, ModelInfo, ModelManager
from shimmy_core.openai_api.assemble import collect, stream
from shimmy_core.openai_api.errors import APIError, model_not_found
from shimmy_core.openai_api.requests import parse_json, parse_request
from shimmy_core.openai_api.responses import ResponseBuilder
from shimmy_core.service import CompletionService
from shimmy_core.settings import Settings


def model_object(info: ModelInfo) -> dict:
    """An OpenAI Model object plus Shimmy's extra metadata fields."""
    body = {"id": info.id, "object": "model", "created": info.created, "owned_by": info.owned_by}
    body.update(
        {
            "context_window": info.context_length,
            "format": info.format,
            "architecture": info.architecture,
            "quantization": info.quantization,
            "parameters": info.parameters,
            "size_bytes": info.size_bytes,
            "source": info.source,
        }
    )
    return body


def read_body(req: falcon.Request, limit: int) -> bytes:
    length = req.content_length
    if length is not None and length > limit:
        raise APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
    raw = req.bounded_stream.read(limit + 1)  # a chunked body has no length to check up front
    if len(raw) > limit:
        raise APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
    return raw


class HealthResource:
    def __init__(self, manager: ModelManager):
        self.manager = manager

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok", "version": __version__, "models": self.manager.stats()}


class ModelsResource:
    def __init__(self, catalog: ModelCatalog):
        self.catalog = catalog

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"object": "list", "data": [model_object(m) for m in self.catalog.list()]}

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        info = self.catalog.get(model_id)
        if info is None:
            raise model_not_found(model_id)
        resp.media = model_object(info)


class GenerationResource:
    """``POST /v1/chat/completions`` (kind "chat") and ``POST /v1/completions`` (kind "completion")."""

    def __init__(self, kind: str, service: CompletionService, settings: Settings):
        self.kind = kind
        self.service = service
        self.settings = settings

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = parse_json(read_body(req, self.settings.max_body_bytes))
        parsed = parse_request(self.kind, body, self.settings.max_n)
        disconnected = req.env.get("waitress.client_disconnected") or (lambda: False)
        # Everything that can fail with a status happens here, before resp.stream is set.
        run = self.service.start(parsed, disconnected)
        builder = ResponseBuilder(self.kind, run.info.id, parsed.prompts[0].params.logprobs)
        events = run.events()
        if not parsed.stream:
            with contextlib.closing(events):
                resp.media = collect(builder, events)
            return
        resp.content_type = "text/event-stream"
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Accel-Buffering", "no")
        resp.stream = stream(builder, events, parsed.include_usage, on_close=events.close)


