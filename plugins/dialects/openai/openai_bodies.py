"""Build OpenAI response bodies and stream chunks from neutral chunks."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from shimmy_core.plugin_api import TokenLogprob, ToolCallDelta, ToolExecuted, Usage

SYSTEM_FINGERPRINT = "shimmy"


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    text: str = ""
    reasoning: str = ""   # a thinking model's reasoning (reasoning_content), kept apart from text
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    logprob_offset: int = 0   # where the first token with logprobs starts in text (after an echo)
    tool_calls: list[dict] = field(default_factory=list)   # OpenAI tool call objects, as they grow
    executed: list[dict] = field(default_factory=list)     # calls the server ran (executed_tool_calls)

    def add_call_delta(self, delta: ToolCallDelta) -> None:
        while len(self.tool_calls) <= delta.call_index:
            self.tool_calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call = self.tool_calls[delta.call_index]
        if delta.id:
            call["id"] = delta.id
        if delta.name:
            call["function"]["name"] = delta.name
        call["function"]["arguments"] += delta.arguments


def executed_body(run: ToolExecuted) -> dict:
    """A call the server ran, as it appears in ``executed_tool_calls`` (Shimmy's extension)."""
    return {
        "id": run.id,
        "type": "function",
        "function": {"name": run.name, "arguments": run.arguments},
        "output": run.output,
        "is_error": run.is_error,
    }


def _message(c: ChoiceState) -> dict:
    message: dict = {
        "role": "assistant",
        # content is null when the model only called tools
        "content": c.text if c.text or not c.tool_calls else None,
        "refusal": None,
    }
    if c.reasoning:  # as llama-server, vLLM and DeepSeek's API put it; absent for models that do not think
        message["reasoning_content"] = c.reasoning
    if c.tool_calls:
        message["tool_calls"] = c.tool_calls
    if c.executed:
        message["executed_tool_calls"] = c.executed
    return message


def usage_body(usages: list[Usage]) -> dict:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    cached = sum(u.cached_tokens for u in usages)
    reasoning = sum(u.reasoning_tokens for u in usages)
    body = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    if reasoning:
        body["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return body


def _chat_logprob(lp: TokenLogprob) -> dict:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": list(lp.bytes),
        "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in lp.top],
    }


def _completion_logprobs(items: list[TokenLogprob], start_offset: int) -> dict:
    offsets, pos = [], start_offset
    for lp in items:
        offsets.append(pos)
        pos += len(lp.token)
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in items],
        "text_offset": offsets,
    }


class ResponseBuilder:
    """Builds the bodies of one response: same ``id``, ``created`` and ``model`` throughout."""

    def __init__(self, kind: str, model: str, want_logprobs: bool):
        self.kind = kind
        self.model = model
        self.want_logprobs = want_logprobs
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    # ------------------------------------------------------------ whole responses
    def response(self, choices: list[ChoiceState], usages: list[Usage]) -> dict:
        if self.kind == "chat":
            body = self._envelope("chat.completion")
            body["choices"] = [
                {
                    "index": c.index,
                    "message": _message(c),
                    "logprobs": (
                        {"content": [_chat_logprob(lp) for lp in c.logprobs], "refusal": None}
                        if self.want_logprobs
                        else None
                    ),
                    "finish_reason": c.finish_reason or "stop",
                }
                for c in choices
            ]
        else:
            body = self._envelope("text_completion")
            body["choices"] = [
                {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": _completion_logprobs(c.logprobs, c.logprob_offset) if self.want_logprobs else None,
                    "finish_reason": c.finish_reason or "stop",
                }
                for c in choices
            ]
        body["usage"] = usage_body(usages)
        return body

    # ------------------------------------------------------------ stream chunks
    def _chunk(self, choices: list[dict], usage: dict | None, include_usage: bool) -> dict:
        body = self._envelope("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        body["choices"] = choices
        # Chat chunks carry "usage": null until the last one (as OpenAI's do); the completions
        # schema has no null usage, so its chunks carry usage only on the last one.
        if usage is not None or (include_usage and self.kind == "chat"):
            body["usage"] = usage
        return body

    def role_chunk(self, index: int, include_usage: bool) -> dict:
        """The first chat chunk of a choice carries the role."""
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._chunk([choice], None, include_usage)

    def text_chunk(
        self, index: int, text: str, logprobs: tuple[TokenLogprob, ...], offset: int, include_usage: bool
    ) -> dict:
        if self.kind == "chat":
            choice = {
                "index": index,
                "delta": {"content": text},
                "logprobs": (
                    {"content": [_chat_logprob(lp) for lp in logprobs], "refusal": None}
                    if self.want_logprobs
                    else None
                ),
                "finish_reason": None,
            }
        else:
            choice = {
                "index": index,
                "text": text,
                "logprobs": _completion_logprobs(list(logprobs), offset) if self.want_logprobs else None,
                "finish_reason": None,
            }
        return self._chunk([choice], None, include_usage)

    def reasoning_chunk(self, index: int, text: str, include_usage: bool) -> dict:
        """A piece of a chat choice's reasoning (``delta.reasoning_content``)."""
        choice = {"index": index, "delta": {"reasoning_content": text}, "logprobs": None, "finish_reason": None}
        return self._chunk([choice], None, include_usage)

    def tool_call_chunk(self, index: int, delta: ToolCallDelta, include_usage: bool) -> dict:
        """A piece of a tool call: the first carries id, type and name, the next ones arguments."""
        call: dict = {"index": delta.call_index}
        if delta.id is not None:
            call.update({"id": delta.id, "type": "function",
                         "function": {"name": delta.name or "", "arguments": delta.arguments}})
        else:
            call["function"] = {"arguments": delta.arguments}
        choice = {"index": index, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}
        return self._chunk([choice], None, include_usage)

    def executed_chunk(self, index: int, run: ToolExecuted, include_usage: bool) -> dict:
        """A call the server ran, streamed as soon as it has run (``delta.executed_tool_calls``)."""
        choice = {"index": index, "delta": {"executed_tool_calls": [executed_body(run)]}, "logprobs": None,
                  "finish_reason": None}
        return self._chunk([choice], None, include_usage)

    def finish_chunk(self, index: int, reason: str, include_usage: bool) -> dict:
        if self.kind == "chat":
            choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": index, "text": "", "logprobs": None, "finish_reason": reason}
        return self._chunk([choice], None, include_usage)

    def usage_chunk(self, usages: list[Usage]) -> dict:
        return self._chunk([], usage_body(usages), True)
