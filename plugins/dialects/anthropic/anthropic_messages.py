"""The Message object and its stream events, built from a run's neutral chunks.

One :class:`MessageBuilder` serves both: fed every chunk, it returns the stream events each one
makes (``content_block_start`` / ``_delta`` / ``_stop``) while it keeps the blocks, so that a
streamed message and a whole one always agree.  Reasoning becomes ``thinking`` blocks, text
``text`` blocks and tool calls ``tool_use`` blocks (``toolu_`` ids, the input in
``input_json_delta`` pieces); a new kind of output closes the block before it.
"""

from __future__ import annotations

import json
import uuid

from shimmy_core.plugin_api import Chunk, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def tool_use_id(call_id: str) -> str:
    """The core's call id (``call_`` and 24 characters) in Anthropic's shape (``toolu_``...)."""
    return "toolu_" + call_id.removeprefix("call_")


def usage_body(usage: Usage | None) -> dict:
    """Anthropic counts prompt tokens read from the (prefix) cache apart from ``input_tokens``."""
    prompt = usage.prompt_tokens if usage else 0
    cached = min(usage.cached_tokens, prompt) if usage else 0
    return {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
            "output_tokens": usage.completion_tokens if usage else 0}


class MessageBuilder:
    def __init__(self, model: str, stop_sequences: tuple[str, ...]):
        self.id = "msg_" + uuid.uuid4().hex[:24]
        self.model = model
        self.stop_sequences = stop_sequences
        self.blocks: list[dict] = []
        self.open: dict | None = None           # the block being written
        self.arguments: dict[int, str] = {}      # tool_use block index -> its input's JSON text so far
        self.finish: Finish | None = None
        self.usage: Usage | None = None

    # ------------------------------------------------------------ blocks
    def _start(self, block: dict) -> list[dict]:
        out = self._close()
        self.blocks.append(block)
        self.open = block
        shown = {**block, "input": {}} if block["type"] == "tool_use" else dict(block)
        return out + [{"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": shown}]

    def _close(self) -> list[dict]:
        if self.open is None:
            return []
        index = len(self.blocks) - 1
        if self.open["type"] == "tool_use":
            self.open["input"] = _input(self.arguments.get(index, ""))
        self.open = None
        return [{"type": "content_block_stop", "index": index}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}

    def feed(self, chunk: Chunk) -> list[dict]:
        """The stream events ``chunk`` makes (none for usage and the finish, which end the message)."""
        out: list[dict] = []
        if isinstance(chunk, TextDelta) and chunk.text:
            if self.open is None or self.open["type"] != "text":
                out += self._start({"type": "text", "text": ""})
            self.open["text"] += chunk.text
            out.append(self._delta({"type": "text_delta", "text": chunk.text}))
        elif isinstance(chunk, ReasoningDelta) and chunk.text:
            if self.open is None or self.open["type"] != "thinking":
                out += self._start({"type": "thinking", "thinking": "", "signature": ""})
            self.open["thinking"] += chunk.text
            out.append(self._delta({"type": "thinking_delta", "thinking": chunk.text}))
        elif isinstance(chunk, ToolCallDelta):
            if chunk.id is not None:
                out += self._start({"type": "tool_use", "id": tool_use_id(chunk.id), "name": chunk.name or "",
                                    "input": {}})
                self.arguments[len(self.blocks) - 1] = ""
            if chunk.arguments and self.open is not None and self.open["type"] == "tool_use":
                self.arguments[len(self.blocks) - 1] += chunk.arguments
                out.append(self._delta({"type": "input_json_delta", "partial_json": chunk.arguments}))
        elif isinstance(chunk, Finish):
            self.finish = chunk
        elif isinstance(chunk, Usage):
            self.usage = chunk
        return out

    # ------------------------------------------------------------ the message
    def stop(self) -> tuple[str, str | None]:
        """``(stop_reason, stop_sequence)``: a stop string of the request's is ``stop_sequence``; the
        model's own end-of-turn strings are ``end_turn``."""
        finish = self.finish or Finish("stop")
        if finish.reason == "stop" and finish.stop is not None and finish.stop in self.stop_sequences:
            return "stop_sequence", finish.stop
        return _STOP_REASONS.get(finish.reason, "end_turn"), None

    def envelope(self, content: list[dict], stop_reason: str | None, stop_sequence: str | None, usage: dict) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}

    def message(self) -> dict:
        """The whole Message, once every chunk is fed."""
        self._close()
        reason, sequence = self.stop()
        return self.envelope(self.blocks, reason, sequence, usage_body(self.usage))

    def start_event(self) -> dict:
        return {"type": "message_start", "message": self.envelope([], None, None, usage_body(None))}

    def end_events(self) -> list[dict]:
        """The last block's stop, ``message_delta`` (stop reason and the usage) and ``message_stop``."""
        out = self._close()
        reason, sequence = self.stop()
        out.append({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": usage_body(self.usage)})
        return out + [{"type": "message_stop"}]


def _input(arguments: str) -> dict:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
