"""A chat request's tools, and the server-side loop.

:class:`ToolPlan` resolves what a request asks (``tools``, ``tool_choice``,
``parallel_tool_calls``, ``response_format``) against the server's :class:`ToolBox`: the tool
definitions the model sees, which calls the server runs itself, the output format that forces a
call (``required`` or a named function; the backend compiles it) and how the prompt carries the
tools.

When the request names a tool the server runs (enabled with ``--enable-tool``), or a text-protocol
tool is enabled, :meth:`ToolPlan.loop` drives the conversation: the model's turn, the server's
calls run (arguments validated first), their results appended as ``tool`` messages, the model
again, until it answers without a server call, the step limit is reached (the last turn then gets
no tools, so it has to answer) or the request's deadline passes.  Text streams as the model writes
it, in every turn; calls for tools the server does not run go back to the client as
``tool_calls``; each call the server ran is reported as a :class:`ToolExecuted` chunk.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from shimmy_core.contract.generation import (
    Chunk,
    Finish,
    GenerationRequest,
    OutputFormat,
    TextDelta,
    ToolCallDelta,
    ToolExecuted,
)
from shimmy_core.tools import tool_prompts
from shimmy_core.tools.requested import RequestedTool, ToolRequest
from shimmy_core.tools.calls import TEXT_TOOL_CLOSE, ToolCallParser, new_call_id
from shimmy_core.tools.toolbox import ToolBox
from shimmy_core import streams

MAX_PARALLEL_CALLS = 4


class ToolRequestError(ValueError):
    """A request's tools cannot be served as asked (400); ``param`` names the field."""

    def __init__(self, message: str, param: str, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


def cut_short(finish: str) -> str:
    """What a server call cut off before its arguments were complete reports (it did not run)."""
    why = "max_tokens or the request's deadline" if finish == "length" else f"finish reason {finish!r}"
    return f"error: the call was cut off by {why} before its arguments were complete; the tool did not run"


def _feed(parser: ToolCallParser, chunk: TextDelta) -> list[Chunk]:
    """The parser's output for one text chunk, with the chunk's logprobs kept."""
    out = parser.feed(chunk.text)
    if chunk.logprobs:
        if len(out) == 1 and isinstance(out[0], TextDelta):
            return [TextDelta(out[0].text, chunk.logprobs)]
        return [TextDelta("", chunk.logprobs), *out]
    return out


def with_tool_calls(chunks: Iterable[tuple[int, Chunk]], make_parser: Callable[[], ToolCallParser]
                    ) -> Iterator[tuple[int, Chunk]]:
    """Pass a run's chunks through one parser per choice: text that is a call becomes
    :class:`ToolCallDelta` chunks, and a choice that made calls finishes with ``tool_calls``."""
    parsers: dict[int, ToolCallParser] = {}
    try:
        for index, chunk in chunks:
            parser = parsers.get(index)
            if parser is None:
                parser = parsers[index] = make_parser()
            if isinstance(chunk, TextDelta):
                for item in _feed(parser, chunk):
                    yield index, item
            elif isinstance(chunk, Finish):
                for item in parser.finish():
                    yield index, item
                yield index, (Finish("tool_calls") if parser.calls and chunk.reason == "stop" else chunk)
            else:
                yield index, chunk
    finally:
        streams.close(chunks)


class ToolPlan:
    """What one request does with tools (see the module docstring)."""

    def __init__(self, request: ToolRequest, toolbox: ToolBox, n: int):
        self.toolbox = toolbox
        self.request = request
        self.definitions: dict[str, dict] = {}
        for tool in request.tools:
            self.definitions[tool.name] = self._definition(tool)
        self.offered = list(self.definitions)
        if request.allowed is not None:
            self.offered = [name for name in self.offered if name in request.allowed]
        self.server = {name for name in self.offered if toolbox.runs(name)}
        self.text_tools = toolbox.text_tools() if n == 1 else {}
        if self.server and n > 1:
            raise ToolRequestError("Tools the server runs itself need 'n' to be 1.", "n")
        self.first_choice = request.choice if self.offered else "none"

    def _definition(self, tool: RequestedTool) -> dict:
        entry = self.toolbox.get(tool.name)
        if entry is not None and (entry.enabled or tool.parameters is None):
            return entry.definition()["function"]  # the server's own definition of its tool
        function: dict[str, Any] = {"name": tool.name}
        if tool.description is not None:
            function["description"] = tool.description
        function["parameters"] = tool.parameters if tool.parameters is not None else {"type": "object", "properties": {}}
        return function

    # ------------------------------------------------------------ what a step asks of the model
    @property
    def active(self) -> bool:
        return bool(self.offered) or bool(self.text_tools)

    @property
    def loops(self) -> bool:
        return bool(self.server) or bool(self.text_tools)

    def _names(self, choice: str) -> list[str]:
        if choice == "none":
            return []
        if choice == "function":
            return [self.request.function]
        return self.offered

    def output_for(self, choice: str) -> OutputFormat | None:
        """The output format of a step: a forced call, a call or the answer (``auto`` with a
        ``response_format``), or the answer's format alone."""
        answer = self.request.answer_schema
        if choice in ("required", "function") or (choice == "auto" and self.offered and answer is not None):
            calls = tuple((name, self.definitions[name].get("parameters")) for name in self._names(choice))
            several = choice == "required" and self.request.parallel is True
            return OutputFormat(answer=answer if choice == "auto" else None, calls=calls,
                                max_calls=MAX_PARALLEL_CALLS if several else 1)
        return OutputFormat(answer=answer) if answer is not None else None

    def step_request(self, base: GenerationRequest, messages: list[dict], choice: str, native: bool,
                     text_tools: bool) -> GenerationRequest:
        """The request for one step of the conversation."""
        names = self._names(choice)
        tools = [{"type": "function", "function": self.definitions[n]} for n in names]
        hint = self.request.function if choice == "function" else (choice if choice == "required" else None)
        params = dataclasses.replace(base.params, output=self.output_for(choice))
        if text_tools and self.text_tools and TEXT_TOOL_CLOSE not in params.stop:
            params = dataclasses.replace(params, stop=params.stop + (TEXT_TOOL_CLOSE,))
        if native:
            return GenerationRequest(messages=tuple(messages), params=params, tools=tuple(tools) or None,
                                     reasoning=base.reasoning)
        if tools or tool_prompts.needs_rewrite(messages):
            messages = tool_prompts.generic_messages(messages, tools, hint)
        return GenerationRequest(messages=tuple(messages), params=params, reasoning=base.reasoning)

    def parser(self, choice: str, text_tools: bool = True) -> ToolCallParser:
        return ToolCallParser(self._names(choice), self.text_tools if text_tools else ())

    # ------------------------------------------------------------ the server-side loop
    def loop(
        self,
        chunks: Iterable[tuple[int, Chunk]],
        base: GenerationRequest,
        submit: Callable[[GenerationRequest], Iterable[tuple[int, Chunk]]],
        native: bool,
        deadline: float,
        on_execute: Callable[[], None] = lambda: None,
    ) -> Iterator[tuple[int, Chunk]]:
        """Run the conversation of a one-choice request (see the module docstring)."""
        current = [chunks]
        try:
            yield from self._loop(current, base, submit, native, deadline, on_execute)
        finally:
            streams.close(current[0])

    def _loop(self, current: list, base: GenerationRequest, submit, native: bool, deadline: float,
              on_execute: Callable[[], None]) -> Iterator[tuple[int, Chunk]]:
        chunks = current[0]
        messages = [dict(m) for m in base.messages or ()]
        choice, step = self.first_choice, 0
        while True:
            client_index: dict[int, int] = {}   # the parser's call index -> the client's
            last = step >= self.toolbox.max_steps  # the last turn gets no tools: it has to answer
            parser = self.parser(choice, text_tools=not last)
            finish, ended = "stop", Finish("stop")
            for _, chunk in chunks:
                if isinstance(chunk, TextDelta):
                    items = _feed(parser, chunk)
                elif isinstance(chunk, Finish):
                    finish, ended = chunk.reason, chunk
                    continue
                else:
                    yield 0, chunk
                    continue
                yield from self._visible(items, parser, client_index)
            yield from self._visible(parser.finish(), parser, client_index)

            server_calls = [c for c in parser.calls if c.name in self.server]
            client_calls = [c for c in parser.calls if c.name not in self.server]
            text_call = parser.text_call
            if text_call is not None and text_call.prefix not in self.text_tools:
                text_call = None
            if (not server_calls and text_call is None) or finish != "stop":
                if text_call is not None and finish != "stop":
                    yield 0, TextDelta(text_call.raw)  # cut short: it is just text
                for call in server_calls:  # cut short (max_tokens, deadline): reported, never run
                    yield 0, ToolExecuted(call.id, call.name, call.arguments, cut_short(finish), is_error=True)
                forced = self.request.function if choice == "function" else None
                if finish != "stop" and not parser.calls and forced in self.server:
                    # the forced call was cut off before even its name was out
                    yield 0, ToolExecuted(new_call_id(), forced, "", cut_short(finish), is_error=True)
                yield 0, Finish("tool_calls") if client_calls and finish == "stop" else ended
                return
            on_execute()
            step += 1
            assistant: dict[str, Any] = {"role": "assistant", "content": parser.content or None}
            results: list[dict] = []
            if server_calls:
                assistant["tool_calls"] = [c.as_openai() for c in server_calls]
                for call in server_calls:
                    outcome = self.toolbox.execute(call.name, call.arguments, deadline)
                    yield 0, ToolExecuted(call.id, call.name, call.arguments, outcome.output, outcome.is_error)
                    results.append({"role": "tool", "tool_call_id": call.id, "name": call.name,
                                    "content": outcome.output})
            if text_call is not None:
                entry = self.text_tools[text_call.prefix]
                arguments = json.dumps({entry.tool.text_argument: text_call.argument}, ensure_ascii=False)
                outcome = self.toolbox.execute(entry.name, arguments, deadline)
                tag = text_call.raw + TEXT_TOOL_CLOSE
                yield 0, TextDelta(tag)
                yield 0, ToolExecuted(new_call_id(), entry.name, arguments, outcome.output, outcome.is_error)
                assistant["content"] = (parser.content + tag).strip()
                results.append({"role": "user", "content": f"<tool_result>\n{outcome.output}\n</tool_result>"})
            if client_calls:  # the client runs the rest of this turn
                yield 0, Finish("tool_calls")
                return
            if time.monotonic() >= deadline:
                yield 0, Finish("length")
                return
            messages += [assistant, *results]
            if step >= self.toolbox.max_steps:
                choice = "none"
            elif choice in ("required", "function"):
                choice = "auto"  # forced once; then the model may answer
            chunks = current[0] = submit(self.step_request(base, messages, choice, native,
                                                           text_tools=step < self.toolbox.max_steps))

    def _visible(self, items: list[Chunk], parser: ToolCallParser, client_index: dict[int, int]
                 ) -> Iterator[tuple[int, Chunk]]:
        """What the client sees of a step's output: its text, and the calls it must run itself."""
        for item in items:
            if not isinstance(item, ToolCallDelta):
                yield 0, item
                continue
            name = item.name if item.id is not None else parser.calls[item.call_index].name
            if name in self.server:
                continue
            if item.call_index not in client_index:
                client_index[item.call_index] = len(client_index)
            yield 0, dataclasses.replace(item, call_index=client_index[item.call_index])
