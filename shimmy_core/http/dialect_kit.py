"""What every dialect's resources share, so that a dialect only parses and frames.

:class:`DialectServer` is the running server as a dialect sees it.  :class:`Generation` is the
part of a generation route that is the same in every wire format: the response cache (lookup,
recording, replay), starting the run with the client's disconnect and the shutdown grace
period, and the request context the access log and metrics read (model, prompt, usage, time to
the first token).  A dialect's resource reads and validates its body into a
:class:`~shimmy_core.parsed_request.ParsedRequest`, calls :meth:`Generation.begin`, and turns the
neutral ``(choice index, chunk)`` events it gets back into its own body or stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import falcon

from shimmy_core import streams
from shimmy_core.contract.dialect import HTTPRefusal
from shimmy_core.contract.generation import Chunk, TextDelta, Usage
from shimmy_core.contract.settings import Settings
from shimmy_core.lifecycle import Lifecycle, ShuttingDown
from shimmy_core.parsed_request import ParsedRequest
from shimmy_core.response_cache import Recorder, ResponseCache, bypass, cache_key, cacheable, replay

if TYPE_CHECKING:  # pragma: no cover - typing only
    from shimmy_core.catalog import ModelCatalog, ModelManager
    from shimmy_core.embedding_service import EmbeddingService
    from shimmy_core.metrics import Metrics
    from shimmy_core.service import CompletionService
    from shimmy_core.tools.toolbox import ToolBox


@dataclass
class DialectServer:
    """The parts of the running server a dialect's resources use (shared, read-only)."""

    settings: Settings
    service: "CompletionService"
    catalog: "ModelCatalog"
    manager: "ModelManager"
    cache: ResponseCache
    lifecycle: Lifecycle
    tools: "ToolBox"
    metrics: "Metrics | None" = None
    embeddings: "EmbeddingService | None" = None   # embeddings and reranking (None: not served)


def read_body(req: falcon.Request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes, chunked bodies included."""
    length = req.content_length
    if length is not None and length > limit:
        raise HTTPRefusal(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
    raw = req.bounded_stream.read(limit + 1)  # a chunked body has no length to check up front
    if len(raw) > limit:
        raise HTTPRefusal(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
    return raw


def send_stream(resp: falcon.Response, body: Iterator[bytes]) -> None:
    """Answer with server-sent events: ``body`` streamed, neither cached nor buffered by proxies."""
    resp.content_type = "text/event-stream"
    resp.set_header("Cache-Control", "no-cache")
    resp.set_header("X-Accel-Buffering", "no")
    resp.stream = body


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


class Generation:
    """One kind of generation route (``kind`` names it in the response cache: ``chat``...)."""

    def __init__(self, kind: str, server: DialectServer):
        self.kind = kind
        self.server = server

    def begin(self, req: falcon.Request, parsed: ParsedRequest, body: dict) -> tuple[str, Iterator[tuple[int, Chunk]]]:
        """Answer from the cache or start the run; ``(model id, events)``.  Every failure with a
        status (unknown model, a full queue, a prompt too long...) is raised here, before the
        dialect sets a stream.  ``body`` is the request as sent, for the cache key."""
        ctx = req.context
        server = self.server
        started = getattr(ctx, "started", None) or time.perf_counter()
        ctx.model = parsed.model
        ctx.prompt = prompt_text(parsed)
        key, info = None, None
        read, write = bypass(req.get_header("Cache-Control"))
        if server.cache.enabled and cacheable(parsed) and (read or write):
            info = server.service.resolve(parsed.model)
            ctx.model = info.id
            backend = server.manager.backend_for(info)
            key = cache_key(self.kind, body, info, getattr(backend, "name", type(backend).__name__), server.settings)
            entry = server.cache.get(key, self.kind) if read else None
            if entry is not None:
                ctx.cache = "hit"
                return info.id, observe(replay(entry), ctx, started)
            if not write:
                key = None
        ctx.cache = "miss"

        client_gone = req.env.get("waitress.client_disconnected") or (lambda: False)
        lifecycle = server.lifecycle

        def disconnected() -> bool:
            return client_gone() or lifecycle.expired()

        run = server.service.start(parsed, disconnected, info)
        ctx.model = run.info.id
        return run.info.id, observe(self._run_events(run, key, disconnected, started), ctx, started)

    def _run_events(self, run, key: str | None, disconnected: Callable[[], bool], started: float):
        """The run's events; past the shutdown grace period an error ends them, and a complete
        answer is stored in the cache (when it has a key and ran no server-side tool)."""
        recorder = Recorder(self.kind) if key is not None else None
        lifecycle = self.server.lifecycle
        events = run.events()
        try:
            for index, chunk in events:
                if lifecycle.expired():
                    raise ShuttingDown("The server shut down before this answer was complete.")
                if recorder is not None:
                    recorder.add(index, chunk)
                yield index, chunk
            if lifecycle.expired():
                raise ShuttingDown("The server shut down before this answer was complete.")
            partial = disconnected() or time.perf_counter() - started >= self.server.settings.request_timeout
            if recorder is not None and not partial and not run.uses_server_tools:
                entry = recorder.entry()
                if entry is not None:
                    self.server.cache.set(key, entry)
        finally:
            events.close()
