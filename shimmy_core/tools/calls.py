"""Tool calls recognised in a model's text, as it streams.

Models write calls in several formats; all of these are recognised:

- Hermes / Qwen: ``<tool_call>{"name": "f", "arguments": {...}}</tool_call>`` (several in a row);
- Llama 3: ``{"name": "f", "parameters": {...}}``, optionally after ``<|python_tag|>``;
- Mistral: ``[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]`` and ``[TOOL_CALLS]f[ARGS]{...}``;
- plain JSON: an object like the above, ``{"function": {"name": ..., "arguments": ...}}``, an array
  of them, or one in a fenced ```` ```json ```` block.

An object counts as a call only if it names one of the request's tools.  The same
:class:`ToolCallParser` serves streamed and whole responses (a whole response is every piece fed,
then :meth:`~ToolCallParser.finish`), so both give the same content and the same calls.  Text that
could start a call is held back until it is known either way; once an object is known to be a call
(its ``name`` came first, as grammar-constrained output always has it), its arguments stream as
they are generated.

The text protocol (``<tool>calc:2*(3+4)</tool>``) is recognised too when the request can use it: the
parser holds ``<tool>...`` back and reports it as :attr:`ToolCallParser.text_call`.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from typing import Collection

from shimmy_core.contract.generation import Chunk, TextDelta, ToolCallDelta

_START_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "```json", "```")
_BETWEEN_MARKERS = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "```json", "```", "[ARGS]")
_ARG_KEYS = ("arguments", "parameters")
TEXT_TOOL_OPEN = "<tool>"
TEXT_TOOL_CLOSE = "</tool>"
_TEXT_TOOL = re.compile(r"\s*<tool>\s*([A-Za-z_][\w-]*)\s*:(.*?)(?:</tool>)?\s*$", re.DOTALL)
_ID_CHARS = string.ascii_letters + string.digits


def new_call_id() -> str:
    """An id in OpenAI's shape: ``call_`` and 24 letters and digits."""
    import secrets

    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""  # the JSON text of the arguments object

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class TextToolCall:
    """``<tool>NAME:ARGUMENT</tool>`` as the model wrote it."""

    prefix: str
    argument: str
    raw: str


class _Object:
    """Scans one JSON object as it arrives, tracking its top-level keys and values so that a
    call's ``name`` is known, and its arguments can be passed on, before the object is complete."""

    def __init__(self, preset_name: str | None = None, args_only: bool = False):
        self.text = ""
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.state = "key?"          # at depth 1: key?, key, colon?, value?, value, after
        self.key_start = 0
        self.key: str | None = None
        self.value_start = -1
        self.value_kind = ""         # "string", "compound" or "scalar"
        self.name = preset_name
        self.args_only = args_only   # the object is the arguments ([TOOL_CALLS]f[ARGS]{...})
        self.args_start = 0 if args_only else -1
        self.args_end = -1
        self.done = False

    def _value_done(self, end: int) -> None:
        """The top-level value ending at ``end`` (exclusive) is complete."""
        raw = self.text[self.value_start:end]
        if self.key == "name" and self.value_kind == "string":
            try:
                self.name = json.loads(raw)
            except ValueError:
                pass
        elif self.key in _ARG_KEYS and self.args_end < 0:
            self.args_end = end
        self.state = "after"

    def feed(self, text: str) -> int:
        """Scan ``text``; return how many of its characters belong to the object (all of them
        unless the object closed inside ``text``)."""
        base = len(self.text)
        self.text += text
        for n, c in enumerate(text):
            i = base + n
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
                    if self.depth == 1 and self.state == "key":
                        try:
                            self.key = json.loads(self.text[self.key_start:i + 1])
                        except ValueError:
                            self.key = None
                        self.state = "colon?"
                    elif self.depth == 1 and self.state == "value" and self.value_kind == "string":
                        self._value_done(i + 1)
                continue
            if c == '"':
                self.in_string = True
                if self.depth == 1 and self.state == "key?":
                    self.state, self.key_start = "key", i
                elif self.depth == 1 and self.state == "value?":
                    self._start_value(i, "string")
            elif c in "{[":
                if self.depth == 1 and self.state == "value?":
                    self._start_value(i, "compound")
                self.depth += 1
            elif c in "}]":
                if self.depth == 1 and self.state == "value" and self.value_kind == "scalar":
                    self._value_done(i)
                self.depth -= 1
                if self.depth == 1 and self.state == "value" and self.value_kind == "compound":
                    self._value_done(i + 1)
                if self.depth == 0:
                    self.done = True
                    self.text = self.text[: i + 1]
                    if self.args_only:
                        self.args_end = i + 1
                    return n + 1
            elif self.depth == 1:
                if c == ":" and self.state == "colon?":
                    self.state = "value?"
                elif c == ",":
                    if self.state == "value" and self.value_kind == "scalar":
                        self._value_done(i)
                    self.state = "key?"
                elif not c.isspace() and self.state == "value?":
                    self._start_value(i, "scalar")
        return len(text)

    def _start_value(self, i: int, kind: str) -> None:
        self.state, self.value_start, self.value_kind = "value", i, kind
        if self.key in _ARG_KEYS and self.args_start < 0:
            self.args_start = i

    def streamable_args(self) -> tuple[int, int] | None:
        """The span of argument text seen so far, when the arguments are an object whose name is
        known: they can be passed on as they come."""
        if self.args_start < 0 or self.name is None:
            return None
        if not self.args_only and self.text[self.args_start:self.args_start + 1] != "{":
            return None
        end = self.args_end if self.args_end >= 0 else len(self.text)
        return self.args_start, end


def _as_call(value: object) -> tuple[str, object] | None:
    """``(name, arguments)`` when ``value`` has the shape of one call."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict) and "name" not in value:
        value = value["function"]
    name = value.get("name")
    if not isinstance(name, str):
        return None
    args = next((value[k] for k in _ARG_KEYS if k in value), {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return name, args


class ToolCallParser:
    """Splits a model's text into content and tool calls, piece by piece.

    ``feed()`` and ``finish()`` return the chunks to pass on: :class:`TextDelta` for content and
    :class:`ToolCallDelta` for calls (a header with id and name, then argument pieces).
    """

    def __init__(self, names: Collection[str], text_tools: Collection[str] = ()):
        self.names = set(names)
        self.text_tools = set(text_tools)
        self.calls: list[ToolCall] = []
        self.text_call: TextToolCall | None = None
        self.content = ""
        self._mode = "start" if self.names else "text"
        self._pending = ""          # start: text not yet classified; text: held back
        self._markers = tuple(m for m in (("<tool_call>",) if self.names else ()) + (
            (TEXT_TOOL_OPEN,) if self.text_tools else ()))
        self._region = ""           # calls mode: text of the region not yet consumed
        self._region_calls = 0
        self._region_raw = ""       # calls mode: everything consumed in this region (for a fallback to text)
        self._obj: _Object | None = None
        self._obj_call: ToolCall | None = None
        self._obj_sent = 0          # argument characters already passed on
        self._after_marker = ""
        self._mistral_name: str | None = None
        self._out: list[Chunk] = []

    # ------------------------------------------------------------ output
    def _text(self, text: str) -> None:
        if text:
            self.content += text
            if self._out and isinstance(self._out[-1], TextDelta):
                self._out[-1] = TextDelta(self._out[-1].text + text)
            else:
                self._out.append(TextDelta(text))

    def _take(self) -> list[Chunk]:
        out, self._out = self._out, []
        return out

    # ------------------------------------------------------------ input
    def feed(self, text: str) -> list[Chunk]:
        if self._mode == "texttool":
            self._pending += text
            return []
        if self._mode == "start":
            self._pending += text
            self._classify_start()
        elif self._mode == "text":
            self._pending += text
            self._scan_text()
        else:
            self._region += text
            self._scan_calls()
        return self._take()

    def finish(self) -> list[Chunk]:
        """The end of the output: release or settle whatever is held."""
        while self._mode == "calls":
            if self._obj_call is not None:  # a call cut short (max_tokens): keep what came
                break
            if self._obj is not None and self._obj.name in self.names:
                self._cut_call()  # cut short before its arguments began: still a call
                break
            if self._region_calls and self._obj is None:
                break  # calls, then at most a marker still arriving: done
            self._fallback_to_text()  # an object or a marker that never became a call
        if self._mode == "texttool":
            match = _TEXT_TOOL.match(self._pending)
            if match and match.group(1) in self.text_tools:
                self.text_call = TextToolCall(match.group(1), match.group(2).strip(), self._pending)
            else:
                self._text(self._pending)
            self._pending = ""
        elif self._mode in ("start", "text"):
            held, self._pending = self._pending, ""
            if not (self.calls and held.isspace()):
                self._text(held)
        return self._take()

    # ------------------------------------------------------------ start and text
    def _classify_start(self) -> None:
        stripped = self._pending.lstrip()
        if not stripped:
            return
        if stripped[0] in "{[" or any(stripped.startswith(m) for m in _START_MARKERS):
            self._mode, self._region, self._region_raw = "calls", stripped, self._pending[: len(self._pending) - len(stripped)]
            self._pending = ""
            self._scan_calls()
            return
        if any(m.startswith(stripped) for m in _START_MARKERS):
            return  # could still become a marker
        self._mode = "text"
        self._scan_text()

    def _scan_text(self) -> None:
        buf = self._pending
        hits = [(buf.find(m), m) for m in self._markers if m in buf]
        if hits:
            at, marker = min(hits)
            before = buf[:at]
            kept = before.rstrip()
            self._text(kept)
            space, rest = before[len(kept):], buf[at:]  # the space goes back if no call follows
            self._pending = ""
            if marker == TEXT_TOOL_OPEN:
                self._mode, self._pending = "texttool", space + rest
            else:
                self._mode, self._region, self._region_raw = "calls", rest, space
                self._scan_calls()
            return
        # hold back what could start a marker, and trailing whitespace (dropped if a call follows)
        keep = 0
        for marker in self._markers:
            for k in range(min(len(marker) - 1, len(buf)), keep, -1):
                if buf.endswith(marker[:k]):
                    keep = k
                    break
        body, tail = buf[: len(buf) - keep], buf[len(buf) - keep:]
        stripped = body.rstrip()
        self._text(stripped)
        self._pending = body[len(stripped):] + tail

    # ------------------------------------------------------------ calls
    def _fallback_to_text(self) -> None:
        """What looked like calls is text after all: pass it on and carry on in text mode."""
        self._text(self._region_raw + (self._obj.text if self._obj else ""))
        self._mode, self._pending = "text", self._region
        self._region = self._region_raw = ""
        self._obj = None
        self._scan_text()

    def _scan_calls(self) -> None:
        while self._region:
            if self._obj is not None:
                used = self._obj.feed(self._region)
                self._region = self._region[used:]
                self._stream_args()
                if not self._obj.done:
                    return
                if not self._close_object():
                    return
                continue
            region = self._region
            stripped = region.lstrip(" \t\r\n,;]")
            if len(stripped) != len(region):
                self._region_raw += region[: len(region) - len(stripped)]
                self._region = region = stripped
                if not region:
                    return
            if self._mistral_name is not None or (self._after_marker == "[TOOL_CALLS]" and region[0].isalpha()):
                if not self._mistral(region):
                    return
                continue
            if any(len(region) < len(m) and m.startswith(region) for m in _BETWEEN_MARKERS):
                return  # a marker still arriving
            marker = next((m for m in _BETWEEN_MARKERS if region.startswith(m)), None)
            if marker:
                self._after_marker = marker
                self._region_raw += marker
                self._region = region[len(marker):]
                continue
            if region[0] == "{":
                self._obj, self._obj_call, self._obj_sent = _Object(), None, 0
                continue
            if region[0] == "[":
                self._region_raw += "["
                self._region = region[1:]
                continue
            if self._region_calls:
                # text after the calls
                self._region_raw = ""
                self._mode, self._pending, self._region = "text", region, ""
                self._scan_text()
                return
            self._fallback_to_text()
            return

    def _mistral(self, region: str) -> bool:
        """``[TOOL_CALLS]name[ARGS]{...}``: read the name, then the arguments object."""
        if self._mistral_name is None:
            match = re.match(r"([A-Za-z_][\w.-]*)\s*(\[ARGS\]|\{)?", region)
            if match is None or match.group(2) is None:
                if len(region) > 80 or (match and match.end() < len(region) and not region[match.end():].startswith("[")):
                    self._fallback_to_text()
                return False
            self._mistral_name = match.group(1)
            self._region_raw += region[: match.start(2)] + ("[ARGS]" if match.group(2) == "[ARGS]" else "")
            self._region = region[match.end(2) if match.group(2) == "[ARGS]" else match.start(2):]
            return True
        if not region.lstrip().startswith("{"):
            if region.strip():
                self._fallback_to_text()
            return False
        self._obj = _Object(preset_name=self._mistral_name, args_only=True)
        self._obj_call, self._obj_sent = None, 0
        self._mistral_name = None
        return True

    def _stream_args(self) -> None:
        obj = self._obj
        span = obj.streamable_args()
        if span is None or obj.name not in self.names:
            return
        if self._obj_call is None:
            self._obj_call = ToolCall(new_call_id(), obj.name)
            self._out.append(ToolCallDelta(len(self.calls), self._obj_call.id, obj.name, ""))
            self.calls.append(self._obj_call)
        start, end = span
        piece = obj.text[start + self._obj_sent:end]
        if piece:
            self._obj_sent += len(piece)
            self._obj_call.arguments += piece
            self._out.append(ToolCallDelta(self.calls.index(self._obj_call), None, None, piece))

    def _cut_call(self) -> None:
        """The object being read names a known function but ended early: a call with whatever
        argument text came (possibly none), so the client or the server loop sees it."""
        obj = self._obj
        arguments = obj.text[obj.args_start:] if obj.args_start >= 0 else ""
        call = ToolCall(new_call_id(), obj.name, arguments)
        index = len(self.calls)
        self.calls.append(call)
        self._out.append(ToolCallDelta(index, call.id, call.name, ""))
        if arguments:
            self._out.append(ToolCallDelta(index, None, None, arguments))
        self._obj = None

    def _close_object(self) -> bool:
        """A complete object: a call, or text after all.  Returns whether scanning goes on."""
        obj, call = self._obj, self._obj_call
        self._obj = None
        self._obj_call = None
        try:
            value = json.loads(obj.text)
        except ValueError:
            value = None
        parsed = (obj.name, value) if obj.args_only and isinstance(value, dict) else _as_call(value)
        if call is not None:  # already streaming: settle the arguments
            self._region_calls += 1
            self._region_raw = ""
            return True
        if parsed is None or parsed[0] not in self.names:
            if self._region_calls:
                self._mode, self._pending = "text", obj.text + self._region
                self._region = self._region_raw = ""
                self._scan_text()
                return False
            self._obj = obj
            self._fallback_to_text()
            return False
        name, args = parsed
        raw = obj.text[obj.args_start:obj.args_end] if obj.args_start >= 0 and obj.args_end >= 0 else ""
        arguments = raw if raw.lstrip().startswith("{") else json.dumps(args, ensure_ascii=False)
        call = ToolCall(new_call_id(), name, arguments)
        index = len(self.calls)
        self.calls.append(call)
        self._out.append(ToolCallDelta(index, call.id, name, ""))
        self._out.append(ToolCallDelta(index, None, None, arguments))
        self._region_calls += 1
        self._region_raw = ""
        return True


def parse_text(text: str, names: Collection[str], text_tools: Collection[str] = ()) -> ToolCallParser:
    """Parse a whole output at once (as a non-streamed response is)."""
    parser = ToolCallParser(names, text_tools)
    parser.feed(text)
    parser.finish()
    return parser
