"""Build the Responses API's ``Response`` object and its stream events from a run's neutral chunks.

One :class:`ResponseRun` follows a run chunk by chunk and says, for each chunk, which stream
events it makes (``response.output_item.added``, ``response.output_text.delta``...), each with
its ``sequence_number``.  A whole (non-streamed) response is the same run with the events left
unsent, so the two cannot disagree.  Output items:

- ``message`` (one ``output_text`` part) from :class:`TextDelta`;
- ``reasoning`` (``summary`` empty, one ``reasoning_text`` part) from :class:`ReasoningDelta`;
- ``function_call`` from :class:`ToolCallDelta`: calls the client runs;
- ``mcp_call`` with ``server_label`` ``"shimmy"`` from :class:`ToolExecuted`: a call the server
  ran itself (``--enable-tool``), with its output, so that no client runs it again.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator

from shimmy_core.plugin_api import (
    Chunk,
    Finish,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    ToolExecuted,
    Usage,
)
from shimmy_plugins.dialects.openai.openai_errors import from_exception
from shimmy_plugins.dialects.openai.openai_stream import sse_event
from shimmy_plugins.dialects.openai.responses_requests import new_id, ResponsesRequest

SERVER_LABEL = "shimmy"


def _logprob(lp: TokenLogprob) -> dict:
    """A token's logprob as an ``output_text`` part carries it (``LogProb``)."""
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.bytes),
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in lp.top]}


def _delta_logprob(lp: TokenLogprob) -> dict:
    """A token's logprob as a delta event carries it (``ResponseLogProb``)."""
    return {"token": lp.token, "logprob": lp.logprob,
            "top_logprobs": [{"token": t.token, "logprob": t.logprob} for t in lp.top]}


def usage_body(usages: list[Usage]) -> dict:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in usages), "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": sum(u.reasoning_tokens for u in usages)},
        "total_tokens": prompt + completion,
    }


class ResponseRun:
    """One response as it is generated: its output items and its stream events."""

    def __init__(self, request: ResponsesRequest, model: str, store: bool):
        self.request = request
        self.id = new_id("resp")
        self.model = model
        self.store = store
        self.created_at = int(time.time())
        self.completed_at: int | None = None
        self.status = "in_progress"
        self.error: dict | None = None
        self.output: list[dict] = []
        self.open: dict | None = None          # the item being written
        self.calls: dict[int, dict] = {}       # call index -> its function_call item
        self.text_logprobs: list[TokenLogprob] = []   # of the open message, for output_text.done
        self.finish = "stop"
        self.usages: list[Usage] = []
        self.sequence = 0

    # ------------------------------------------------------------ the Response object
    def response(self) -> dict:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "completed_at": self.completed_at,
            "error": self.error,
            "incomplete_details": {"reason": "max_output_tokens"} if self.status == "incomplete" else None,
            "model": self.model,
            "output": [dict(item) for item in self.output],
            "store": self.store,
            "background": False,
            "service_tier": "default",
        }
        body.update({k: v for k, v in self.request.echo.items() if v is not None or k != "user"})
        if self.status != "in_progress" and self.usages:  # the schema has no null usage: absent until known
            body["usage"] = usage_body(self.usages)
        return body

    def _event(self, kind: str, **fields: Any) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def start(self) -> list[dict]:
        return [self._event("response.created", response=self.response()),
                self._event("response.in_progress", response=self.response())]

    # ------------------------------------------------------------ items
    def _add(self, item: dict) -> list[dict]:
        self.output.append(item)
        self.open = item
        return [self._event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item))]

    def _open_part(self, item: dict, part: dict) -> list[dict]:
        events = self._add(item)
        item["content"] = [part]
        events.append(self._event("response.content_part.added", item_id=item["id"], output_index=len(self.output) - 1,
                                  content_index=0, part=dict(part)))
        return events

    def _close(self, status: str = "completed") -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        index = self.output.index(item)
        events = []
        item["status"] = status if item["type"] != "mcp_call" else item["status"]
        if item["type"] in ("message", "reasoning"):
            part = item["content"][0]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            if item["type"] == "message":
                lps = [_delta_logprob(lp) for lp in self.text_logprobs]
                self.text_logprobs = []
                events.append(self._event("response.output_text.done", **where, text=part["text"], logprobs=lps))
            else:
                events.append(self._event("response.reasoning_text.done", **where, text=part["text"]))
            events.append(self._event("response.content_part.done", **where, part=dict(part)))
        elif item["type"] == "function_call":
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"], name=item["name"],
                                      output_index=index, arguments=item["arguments"]))
        events.append(self._event("response.output_item.done", output_index=index, item=dict(item)))
        return events

    def _text(self, chunk: TextDelta) -> list[dict]:
        events: list[dict] = []
        if self.open is None or self.open["type"] != "message":
            if not chunk.text and not chunk.logprobs:
                return []
            events += self._close()
            events += self._open_part(
                {"type": "message", "id": new_id("msg"), "role": "assistant", "status": "in_progress", "content": []},
                {"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        part = self.open["content"][0]
        part["text"] += chunk.text
        part["logprobs"] = part["logprobs"] + [_logprob(lp) for lp in chunk.logprobs]
        self.text_logprobs.extend(chunk.logprobs)
        events.append(self._event("response.output_text.delta", item_id=self.open["id"],
                                  output_index=len(self.output) - 1, content_index=0, delta=chunk.text,
                                  logprobs=[_delta_logprob(lp) for lp in chunk.logprobs]))
        return events

    def _reasoning(self, chunk: ReasoningDelta) -> list[dict]:
        events: list[dict] = []
        if self.open is None or self.open["type"] != "reasoning":
            if not chunk.text:
                return []
            events += self._close()
            events += self._open_part({"type": "reasoning", "id": new_id("rs"), "summary": [], "status": "in_progress"},
                                      {"type": "reasoning_text", "text": ""})
        self.open["content"][0]["text"] += chunk.text
        events.append(self._event("response.reasoning_text.delta", item_id=self.open["id"],
                                  output_index=len(self.output) - 1, content_index=0, delta=chunk.text))
        return events

    def _call(self, chunk: ToolCallDelta) -> list[dict]:
        events: list[dict] = []
        if chunk.id is not None:
            events += self._close()
            item = {"type": "function_call", "id": new_id("fc"), "call_id": chunk.id, "name": chunk.name or "",
                    "arguments": "", "status": "in_progress"}
            if item["name"] in self.request.namespaces:
                item["namespace"] = self.request.namespaces[item["name"]]
            self.calls[chunk.call_index] = item
            events += self._add(item)
        item = self.calls[chunk.call_index]
        if chunk.arguments:
            item["arguments"] += chunk.arguments
            events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                      output_index=self.output.index(item), delta=chunk.arguments))
        return events

    def _executed(self, run: ToolExecuted) -> list[dict]:
        item = {"type": "mcp_call", "id": run.id, "server_label": SERVER_LABEL, "name": run.name,
                "arguments": run.arguments, "output": run.output,
                "error": {"type": "mcp_tool_execution_error", "content": run.output} if run.is_error else None,
                "status": "failed" if run.is_error else "completed"}
        events = self._close()
        events += self._add(item)
        return events + self._close()

    def feed(self, chunk: Chunk) -> list[dict]:
        """The stream events one neutral chunk makes."""
        if isinstance(chunk, TextDelta):
            return self._text(chunk)
        if isinstance(chunk, ReasoningDelta):
            return self._reasoning(chunk)
        if isinstance(chunk, ToolCallDelta):
            return self._call(chunk)
        if isinstance(chunk, ToolExecuted):
            return self._executed(chunk)
        if isinstance(chunk, Finish):
            self.finish = chunk.reason
        elif isinstance(chunk, Usage):
            self.usages.append(chunk)
        return []

    # ------------------------------------------------------------ the end
    def end(self) -> list[dict]:
        """Close the last item; ``response.completed``, or ``response.incomplete`` when the output
        was cut off by ``max_output_tokens`` (or the request's deadline)."""
        incomplete = self.finish == "length"
        events = self._close("incomplete" if incomplete else "completed")
        self.status = "incomplete" if incomplete else "completed"
        self.completed_at = int(time.time()) if not incomplete else None
        kind = "response.incomplete" if incomplete else "response.completed"
        return events + [self._event(kind, response=self.response())]

    def fail(self, exc: BaseException) -> list[dict]:
        """An error after the stream began: an ``error`` event, then ``response.failed``."""
        err = from_exception(exc)
        events = self._close("incomplete")
        self.status = "failed"
        code = "rate_limit_exceeded" if err.status in (429, 503) else (
            "invalid_prompt" if err.status == 400 else "server_error")
        self.error = {"code": code, "message": err.message}
        return events + [self._event("error", code=err.code or code, message=err.message, param=err.param),
                         self._event("response.failed", response=self.response())]


def collect(run: ResponseRun, events) -> dict:
    """Run to the end and return the whole Response object."""
    for _, chunk in events:
        run.feed(chunk)
    run.end()
    return run.response()


def stream(run: ResponseRun, events: Iterable[tuple[int, Chunk]], on_end: Callable[[dict], None],
           on_close: Callable[[], None]) -> Iterator[bytes]:
    """The SSE events of a response (``event:`` and ``data:`` lines, no ``[DONE]``, as OpenAI sends
    them); an error after the headers becomes ``error`` and ``response.failed``, never silence.
    ``on_end`` gets the final Response (completed, incomplete or failed); a client that left
    gets nothing more and nothing is kept."""
    try:
        for event in run.start():
            yield sse_event(event, event["type"])
        for _, chunk in events:
            for event in run.feed(chunk):
                yield sse_event(event, event["type"])
        finals = run.end()
    except GeneratorExit:
        raise
    except Exception as exc:  # headers are gone: report in-band
        finals = run.fail(exc)
    finally:
        on_close()
    for event in finals:
        yield sse_event(event, event["type"])
    on_end(run.response())
