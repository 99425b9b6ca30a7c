"""Turn a run's neutral ``(index, chunk)`` events into a whole OpenAI response or into a
stream of server-sent events (the one place that frames ``data: ...`` lines)."""

from __future__ import annotations

import json
from typing import Callable, Iterable, Iterator

from shimmy_core.plugin_api import Chunk, Finish, ReasoningDelta, TextDelta, ToolCallDelta, ToolExecuted, Usage
from shimmy_plugins.dialects.openai.openai_bodies import ChoiceState, ResponseBuilder, executed_body
from shimmy_plugins.dialects.openai.openai_errors import from_exception

DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict, event: str | None = None) -> bytes:
    """One SSE event carrying a JSON object, with an ``event:`` line when ``event`` names it."""
    head = b"event: " + event.encode("utf-8") + b"\n" if event else b""
    return head + b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def collect(builder: ResponseBuilder, events: Iterable[tuple[int, Chunk]]) -> dict:
    """Run every choice to the end and build the non-streamed response."""
    choices: dict[int, ChoiceState] = {}
    usages: list[Usage] = []
    for index, chunk in events:
        state = choices.setdefault(index, ChoiceState(index))
        if isinstance(chunk, TextDelta):
            if chunk.logprobs and not state.logprobs:
                state.logprob_offset = len(state.text)
            state.text += chunk.text
            state.logprobs.extend(chunk.logprobs)
        elif isinstance(chunk, ReasoningDelta):
            state.reasoning += chunk.text
        elif isinstance(chunk, ToolCallDelta):
            state.add_call_delta(chunk)
        elif isinstance(chunk, ToolExecuted):
            state.executed.append(executed_body(chunk))
        elif isinstance(chunk, Finish):
            state.finish_reason = chunk.reason
        elif isinstance(chunk, Usage):
            usages.append(chunk)
    return builder.response([choices[i] for i in sorted(choices)], usages)


def stream(
    builder: ResponseBuilder,
    events: Iterable[tuple[int, Chunk]],
    include_usage: bool,
    on_close: Callable[[], None] = lambda: None,
) -> Iterator[bytes]:
    """Yield SSE bytes; an error after the headers became a final error event, then ``[DONE]``."""
    usages: list[Usage] = []
    started: set[int] = set()
    offsets: dict[int, int] = {}
    try:
        for index, chunk in events:
            if builder.kind == "chat" and index not in started:
                started.add(index)
                yield sse_event(builder.role_chunk(index, include_usage))
            if isinstance(chunk, TextDelta):
                if chunk.text or chunk.logprobs:
                    offset = offsets.get(index, 0)
                    offsets[index] = offset + len(chunk.text)
                    yield sse_event(builder.text_chunk(index, chunk.text, chunk.logprobs, offset, include_usage))
            elif isinstance(chunk, ReasoningDelta):
                if chunk.text and builder.kind == "chat":
                    yield sse_event(builder.reasoning_chunk(index, chunk.text, include_usage))
            elif isinstance(chunk, ToolCallDelta):
                yield sse_event(builder.tool_call_chunk(index, chunk, include_usage))
            elif isinstance(chunk, ToolExecuted):
                yield sse_event(builder.executed_chunk(index, chunk, include_usage))
            elif isinstance(chunk, Finish):
                yield sse_event(builder.finish_chunk(index, chunk.reason, include_usage))
            elif isinstance(chunk, Usage):
                usages.append(chunk)
        if include_usage:
            yield sse_event(builder.usage_chunk(usages))
    except GeneratorExit:
        raise
    except Exception as exc:  # headers are gone: report in-band, never silence
        yield sse_event(from_exception(exc).body())
    finally:
        on_close()
    yield DONE
