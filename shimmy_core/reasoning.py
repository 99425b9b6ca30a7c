"""Thinking kept apart from the answer.

A model whose chat template marks reasoning (``<think>...</think>``, or gpt-oss's analysis and
final channels) writes its thoughts as ordinary text.  :func:`reasoning_syntax` reads the markers
off the template; :class:`ReasoningParser` splits one choice's streamed text into
:class:`~shimmy_core.contract.generation.ReasoningDelta` and
:class:`~shimmy_core.contract.generation.TextDelta` chunks as it arrives, a marker split across
tokens included, and counts the reasoning tokens; :func:`split_reasoning` applies it to a run's
``(choice index, chunk)`` stream, before the tool-call parser, so that a call written inside the
thinking is not a call.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator

from shimmy_core import streams
from shimmy_core.contract.generation import Chunk, Finish, ReasoningDelta, ReasoningSyntax, TextDelta, Usage

THINK = ReasoningSyntax("<think>", "</think>")
CHANNELS = ReasoningSyntax("<|channel|>analysis<|message|>", "<|end|>", "<|channel|>final<|message|>")
EFFORTS = ("none", "minimal", "low", "medium", "high")

_START, _THINKING, _BETWEEN, _LEAD, _ANSWER = range(5)


def reasoning_syntax(template_source: str) -> ReasoningSyntax | None:
    """The reasoning markers a chat template uses, or None for a model that does not think."""
    if "<|channel|>" in template_source and "analysis" in template_source:
        return CHANNELS
    if "<think>" in template_source and "</think>" in template_source:
        return THINK
    return None


def opens_thinking(syntax: ReasoningSyntax | None, prompt: str) -> bool:
    """Whether a rendered prompt leaves the model inside its reasoning."""
    return syntax is not None and prompt.rstrip().endswith(syntax.open.rstrip())


def forced_close(syntax: ReasoningSyntax) -> str:
    """What ends the reasoning when its budget is spent, as the model would have written it."""
    return "\n" + syntax.close + (syntax.answer_start or "\n\n")


def _held(buffer: str, marker: str) -> int:
    """Length of the longest end of ``buffer`` that could be the start of ``marker``."""
    for n in range(min(len(buffer), len(marker) - 1), 0, -1):
        if marker.startswith(buffer[-n:]):
            return n
    return 0


class ReasoningParser:
    """Splits one choice's text, fed piece by piece, into reasoning and answer."""

    def __init__(self, syntax: ReasoningSyntax, thinking: bool):
        self.syntax = syntax
        self.state = _THINKING if thinking else _START
        self.buffer = ""
        self.raw = ""            # every piece fed, as the model wrote it
        self.tokens = 0          # pieces fed while thinking (a piece is a token)
        self._lead = True        # the reasoning's leading whitespace is dropped

    @property
    def thinking(self) -> bool:
        return self.state == _THINKING

    def feed(self, text: str) -> list[Chunk]:
        if self.state in (_START, _THINKING):
            self.tokens += 1 if self.state == _THINKING or self._opening(text) else 0
        self.raw += text
        self.buffer += text
        return self._drain(final=False)

    def _opening(self, text: str) -> bool:
        return (self.buffer + text).lstrip().startswith(self.syntax.open)

    def finish(self) -> list[Chunk]:
        return self._drain(final=True)

    def end_thinking(self) -> list[Chunk]:
        """The budget is spent: what was held of the reasoning, and the answer comes next."""
        out = self._reasoning(self.buffer.rstrip()) if self.state == _THINKING else []
        self.buffer, self.state = "", _LEAD
        return out

    def _reasoning(self, text: str) -> list[Chunk]:
        if self._lead:
            text = text.lstrip()
            self._lead = not text
        return [ReasoningDelta(text)] if text else []

    def _drain(self, final: bool) -> list[Chunk]:
        out: list[Chunk] = []
        while True:
            before = (self.state, len(self.buffer))
            if self.state == _START:
                stripped = self.buffer.lstrip()
                if stripped.startswith(self.syntax.open):
                    self.buffer, self.state = stripped[len(self.syntax.open):], _THINKING
                elif stripped and not self.syntax.open.startswith(stripped) or final:
                    self.state = _ANSWER
            elif self.state == _THINKING:
                at = self.buffer.find(self.syntax.close)
                if at >= 0:
                    out += self._reasoning(self.buffer[:at].rstrip())
                    self.buffer = self.buffer[at + len(self.syntax.close):]
                    self.state = _BETWEEN if self.syntax.answer_start else _LEAD
                elif final:
                    out += self._reasoning(self.buffer.rstrip())
                    self.buffer = ""
                else:  # hold back what may start the close marker, and the whitespace before it
                    rest = self.buffer[:len(self.buffer) - _held(self.buffer, self.syntax.close)]
                    text = rest.rstrip()
                    out += self._reasoning(text)
                    self.buffer = self.buffer[len(text):]
            elif self.state == _BETWEEN:
                at = self.buffer.find(self.syntax.answer_start)
                if at >= 0:
                    self.buffer, self.state = self.buffer[at + len(self.syntax.answer_start):], _LEAD
                elif final:
                    self.buffer = ""
                else:
                    keep = _held(self.buffer, self.syntax.answer_start)
                    self.buffer = self.buffer[len(self.buffer) - keep:]
            elif self.state == _LEAD:
                self.buffer = self.buffer.lstrip()
                if self.buffer:
                    self.state = _ANSWER
            else:  # _ANSWER
                if self.buffer:
                    out.append(TextDelta(self.buffer))
                    self.buffer = ""
            if (self.state, len(self.buffer)) == before:
                return out


def split_reasoning(chunks: Iterable[tuple[int, Chunk]], parsers: dict[int, ReasoningParser],
                    budget: int = -1, force: Callable[[str], Iterable[tuple[int, Chunk]]] | None = None
                    ) -> Iterator[tuple[int, Chunk]]:
    """The run's chunks with each choice's reasoning apart (choices without a parser pass as
    they are), its usage counting the reasoning tokens.  With a ``budget`` (>= 0) and ``force``
    (one choice only): once the reasoning reaches ``budget`` tokens the generation is stopped and
    ``force(raw text)`` continues it from the reasoning closed; the usage then sums both parts."""
    current = [iter(chunks)]
    try:
        yield from _split(current, parsers, budget, force)
    finally:
        streams.close(current[0])


def _split(current: list, parsers: dict[int, ReasoningParser], budget: int, force) -> Iterator[tuple[int, Chunk]]:
    spent = 0   # tokens of a part stopped for the budget
    while True:
        restart = None
        for index, chunk in current[0]:
            parser = parsers.get(index)
            if parser is None:
                yield index, chunk
            elif isinstance(chunk, TextDelta):
                items = parser.feed(chunk.text)
                if chunk.logprobs and any(isinstance(i, TextDelta) for i in items):
                    first = next(i for i, item in enumerate(items) if isinstance(item, TextDelta))
                    items[first] = TextDelta(items[first].text, chunk.logprobs)
                for item in items:
                    yield index, item
                if force is not None and budget >= 0 and parser.thinking and parser.tokens >= budget:
                    restart = index
                    break
            elif isinstance(chunk, Finish):
                for item in parser.finish():
                    yield index, item
                yield index, chunk
            elif isinstance(chunk, Usage):
                yield index, dataclasses.replace(chunk, completion_tokens=chunk.completion_tokens + spent,
                                                 reasoning_tokens=parser.tokens)
            else:
                yield index, chunk
        if restart is None:
            return
        parser = parsers[restart]
        streams.close(current[0])
        spent = parser.tokens
        for item in parser.end_thinking():
            yield restart, item
        current[0] = iter(force(parser.raw))
