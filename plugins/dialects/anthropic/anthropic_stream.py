"""Anthropic's server-sent events: ``event: NAME`` and ``data: JSON`` lines, the exact sequence of
the Messages API (``message_start``, a ``ping`` while the prompt is processed, the content blocks,
``message_delta``, ``message_stop``), and an ``error`` event when the run fails after the headers."""

from __future__ import annotations

import json
from typing import Iterable, Iterator

from shimmy_core.plugin_api import Chunk, with_heartbeat
from shimmy_plugins.dialects.anthropic.anthropic_errors import from_exception
from shimmy_plugins.dialects.anthropic.anthropic_messages import MessageBuilder

PING = {"type": "ping"}
PING_INTERVAL_S = 5.0


def sse_event(payload: dict) -> bytes:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"event: {payload['type']}\ndata: {data}\n\n".encode("utf-8")


def collect(builder: MessageBuilder, events: Iterable[tuple[int, Chunk]]) -> dict:
    """The whole Message."""
    for _, chunk in events:
        builder.feed(chunk)
    return builder.message()


def stream(builder: MessageBuilder, events: Iterable[tuple[int, Chunk]],
           ping_every: float = PING_INTERVAL_S) -> Iterator[bytes]:
    """The Message as SSE bytes; an error after the headers is a final ``error`` event.  A ``ping``
    follows ``message_start`` and comes again every ``ping_every`` seconds without output: Claude
    Code gives up on a stream that stays silent (a long prompt on a CPU takes minutes)."""
    beats = with_heartbeat(events, ping_every)  # it owns the events from now on, and closes them
    try:
        yield sse_event(builder.start_event())
        yield sse_event(PING)
        for item in beats:
            if item is None:
                yield sse_event(PING)
                continue
            for event in builder.feed(item[1]):
                yield sse_event(event)
        for event in builder.end_events():
            yield sse_event(event)
    except GeneratorExit:
        raise
    except Exception as exc:  # headers are gone: report in-band, never silence
        yield sse_event(from_exception(exc).body())
    finally:
        beats.close()
