"""Falcon resources: thin classes that read a body, call the service (or the
response cache) and hand the result to the ``openai_api`` builders."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import falcon

from shimmy_core import __version__
from shimmy_core.contract.generation import Chunk, TextDelta, UnsupportedOutputSchema, Usage
from shimmy_core.lifecycle import RETRY_AFTER_SHUTDOWN_S, Lifecycle, ShuttingDown
from shimmy_core.metrics import CONTENT_TYPE, Metrics
from shimmy_core.catalog import ModelCatalog, ModelManager
from shimmy_core.contract.model_info import ModelInfo
from shimmy_core.openai_api.assemble import collect, stream
from shimmy_core.openai_api.errors import APIError, invalid, model_not_found
from shimmy_core.openai_api.requests import parse_json, parse_request, unsupported_schema
from shimmy_core.parsed_request import ParsedRequest
from shimmy_core.openai_api.responses import ResponseBuilder
from shimmy_core.response_cache import (
    SERVER_TOOLS_FLAG,
    Recorder,
    ResponseCache,
    bypass,
    cache_key,
    cacheable,
    replay,
)
from shimmy_core.service import CompletionService
from shimmy_core.contract.settings import Settings
from shimmy_core import streams


def model_object(info: ModelInfo, unavailable: str | None = None) -> dict:
    """An OpenAI Model object plus Shimmy's extra metadata fields; ``available`` is false
    (with the reason, e.g. the pip command to run) when no usable backend can serve it."""
    body = {"id": info.id, "object": "model", "created": info.created, "owned_by": info.owned_by,
            "available": unavailable is None, "unavailable_reason": unavailable}
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
    def __init__(self, manager: ModelManager, lifecycle: Lifecycle | None = None):
        self.manager = manager
        self.lifecycle = lifecycle

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        status = "ok"
        if self.lifecycle is not None and self.lifecycle.draining:
            status = "shutting_down"
            resp.status = falcon.HTTP_503
            resp.set_header("Retry-After", str(RETRY_AFTER_SHUTDOWN_S))
        resp.media = {"status": status, "version": __version__, "models": self.manager.stats()}


class MetricsResource:
    """``GET /metrics``: Prometheus text format."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = CONTENT_TYPE
        resp.data = self.metrics.render()


class ModelsResource:
    def __init__(self, catalog: ModelCatalog, manager: ModelManager):
        self.catalog = catalog
        self.manager = manager

    def _object(self, info: ModelInfo) -> dict:
        return model_object(info, self.manager.unavailable_reason(info))

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"object": "list", "data": [self._object(m) for m in self.catalog.list()]}

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        info = self.catalog.get(model_id)
        if info is None:
            raise model_not_found(model_id)
        resp.media = self._object(info)


def prompt_text(parsed: ParsedRequest) -> list:
    """What ``--log-prompts`` writes: the messages, or the prompt strings."""
    return [list(p.messages) if p.messages is not None else p.prompt for p in parsed.prompts]


def observe(events: Iterator[tuple[int, Chunk]], ctx, started: float) -> Iterator[tuple[int, Chunk]]:
    """Pass events through, noting usage and the time to the first text in the request context."""
    prompt = completion = 0
    try:
        for index, chunk in events:
            if isinstance(chunk, Usage):
                prompt += chunk.prompt_tokens
                completion += chunk.completion_tokens
                ctx.usage = (prompt, completion)
            elif isinstance(chunk, TextDelta) and chunk.text and getattr(ctx, "ttft", None) is None:
                ctx.ttft = time.perf_counter() - started
            yield index, chunk
    finally:
        streams.close(events)


class GenerationResource:
    """``POST /v1/chat/completions`` (kind "chat") and ``POST /v1/completions`` (kind "completion")."""

    def __init__(self, kind: str, service: CompletionService, settings: Settings,
                 cache: ResponseCache | None = None, lifecycle: Lifecycle | None = None):
        self.kind = kind
        self.service = service
        self.settings = settings
        self.cache = cache or ResponseCache(None, settings)
        self.lifecycle = lifecycle or Lifecycle(settings.shutdown_grace)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        ctx = req.context
        started = getattr(ctx, "started", None) or time.perf_counter()
        body = parse_json(read_body(req, self.settings.max_body_bytes))
        parsed = parse_request(self.kind, body, self.settings.max_n)
        ctx.model = parsed.model
        if self.kind == "chat" and len(body["messages"]) > self.settings.max_messages:
            raise invalid(f"Too many messages: {len(body['messages'])}; this server accepts at most "
                          f"{self.settings.max_messages} (SHIMMY_MAX_MESSAGES).", param="messages",
                          code="too_many_messages")
        ctx.prompt = prompt_text(parsed)
        builder_logprobs = parsed.prompts[0].params.logprobs

        key = None
        read, write = bypass(req.get_header("Cache-Control"))
        if self.cache.enabled and cacheable(parsed) and (read or write):
            info = self.service.resolve(parsed.model)
            ctx.model = info.id
            backend = self.service.manager.backend_for(info)
            key = cache_key(self.kind, body, info, getattr(backend, "name", type(backend).__name__), self.settings)
            entry = self.cache.get(key, self.kind) if read else None
            if entry is not None:
                ctx.cache = "hit"
                builder = ResponseBuilder(self.kind, info.id, builder_logprobs)
                self._answer(resp, parsed, builder, observe(replay(entry), ctx, started))
                return
            if not write:
                key = None
        ctx.cache = "miss"

        client_gone = req.env.get("waitress.client_disconnected") or (lambda: False)
        lifecycle = self.lifecycle

        def disconnected() -> bool:
            return client_gone() or lifecycle.expired()

        # Everything that can fail with a status happens here, before resp.stream is set.
        try:
            run = self.service.start(parsed, disconnected)
        except UnsupportedOutputSchema as exc:
            raise unsupported_schema(exc, body) from None
        ctx.model = run.info.id
        builder = ResponseBuilder(self.kind, run.info.id, builder_logprobs)
        events = self._run_events(run, key, disconnected, started)
        self._answer(resp, parsed, builder, observe(events, ctx, started))

    def _run_events(self, run, key: str | None, disconnected: Callable[[], bool], started: float):
        """The run's events; past the shutdown grace period an error ends them, and a complete
        answer is stored in the cache (when it has a key and ran no server-side tool)."""
        recorder = Recorder(self.kind) if key is not None else None
        events = run.events()
        try:
            for index, chunk in events:
                if self.lifecycle.expired():
                    raise ShuttingDown("The server shut down before this answer was complete.")
                if recorder is not None:
                    recorder.add(index, chunk)
                yield index, chunk
            if self.lifecycle.expired():
                raise ShuttingDown("The server shut down before this answer was complete.")
            partial = disconnected() or time.perf_counter() - started >= self.settings.request_timeout
            if recorder is not None and not partial and not getattr(run, SERVER_TOOLS_FLAG, False):
                entry = recorder.entry()
                if entry is not None:
                    self.cache.set(key, entry)
        finally:
            events.close()

    def _answer(self, resp: falcon.Response, parsed: ParsedRequest, builder: ResponseBuilder, events) -> None:
        if not parsed.stream:
            with contextlib.closing(events):
                resp.media = collect(builder, events)
            return
        resp.content_type = "text/event-stream"
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Accel-Buffering", "no")
        resp.stream = stream(builder, events, parsed.include_usage, on_close=events.close)


class ToolsResource:
    """``GET /v1/tools``: the registered tools, their schemas and whether the server runs them."""

    def __init__(self, tools):
        self.tools = tools

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"object": "list", "data": self.tools.listing()}
