"""Ollama's answers from a run's neutral events: the NDJSON lines of ``/api/chat`` and
``/api/generate`` (one JSON object a line, the last with ``done: true``, ``done_reason`` and the
timings in nanoseconds), or the same answer as one object when ``stream`` is false."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator

from shimmy_core.plugin_api import Chunk, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from shimmy_plugins.dialects.ollama.ollama_errors import as_ollama

NDJSON = "application/x-ndjson"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ndjson(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


class Reply:
    """One answer in the making.  ``chat``: pieces under ``message`` (``content``, ``thinking``,
    ``tool_calls`` with their arguments as objects); else generate's ``response`` and ``thinking``.
    ``started`` is when the request arrived, ``begun`` when the model was loaded and the run admitted."""

    def __init__(self, chat: bool, model: str, started: float, begun: float):
        self.chat = chat
        self.model = model
        self.started = started
        self.begun = begun
        self.first: float | None = None
        self.text = ""
        self.thinking = ""
        self.calls: list[dict] = []       # {"name", "arguments" (JSON text)} as they grow
        self.reason = "stop"
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def add(self, chunk: Chunk) -> dict | None:
        """Note a chunk; the streamed line it makes, if any."""
        if self.first is None:
            self.first = time.perf_counter()
        if isinstance(chunk, TextDelta) and chunk.text:
            self.text += chunk.text
            return self._line(chunk.text, "")
        if isinstance(chunk, ReasoningDelta) and chunk.text:
            self.thinking += chunk.text
            return self._line("", chunk.text)
        if isinstance(chunk, ToolCallDelta):
            while len(self.calls) <= chunk.call_index:
                self.calls.append({"name": "", "arguments": ""})
            call = self.calls[chunk.call_index]
            call["name"] = chunk.name or call["name"]
            call["arguments"] += chunk.arguments
        elif isinstance(chunk, Finish):
            self.reason = chunk.reason if chunk.reason in ("stop", "length") else "stop"
            if self.calls:  # Ollama sends each call whole, in a line of its own
                return self._line("", "", self.tool_calls())
        elif isinstance(chunk, Usage):
            self.prompt_tokens += chunk.prompt_tokens
            self.completion_tokens += chunk.completion_tokens
        return None

    def tool_calls(self) -> list[dict]:
        calls = []
        for call in self.calls:
            try:
                arguments = json.loads(call["arguments"] or "{}")
            except ValueError:
                arguments = call["arguments"]
            calls.append({"function": {"name": call["name"], "arguments": arguments}})
        return calls

    def _line(self, text: str, thinking: str, calls: list[dict] | None = None, done: bool = False) -> dict:
        body: dict = {"model": self.model, "created_at": now_iso()}
        if self.chat:
            message: dict = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            body["message"] = message
        else:
            body["response"] = text
            if thinking:
                body["thinking"] = thinking
        body["done"] = done
        return body

    def final(self, whole: bool) -> dict:
        """The last line (``whole``: the entire answer in it, for ``stream: false``)."""
        end = time.perf_counter()
        first = self.first or end
        if whole:
            body = self._line(self.text, self.thinking, self.tool_calls(), done=True)
        else:
            body = self._line("", "", done=True)
        body.update({
            "done_reason": self.reason,
            "total_duration": _ns(end - self.started),
            "load_duration": _ns(self.begun - self.started),
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": _ns(first - self.begun),
            "eval_count": self.completion_tokens,
            "eval_duration": _ns(end - first),
        })
        return body


def whole(reply: Reply, events: Iterable[tuple[int, Chunk]]) -> dict:
    for _, chunk in events:
        reply.add(chunk)
    return reply.final(whole=True)


def lines(reply: Reply, events: Iterable[tuple[int, Chunk]], on_close: Callable[[], None]) -> Iterator[bytes]:
    """The NDJSON stream; an error once the headers are sent is a last ``{"error": ...}`` line."""
    try:
        for _, chunk in events:
            line = reply.add(chunk)
            if line is not None:
                yield ndjson(line)
        yield ndjson(reply.final(whole=False))
    except GeneratorExit:
        raise
    except Exception as exc:  # headers are gone: say it in-band
        yield ndjson({"error": as_ollama(exc).message})
    finally:
        on_close()
