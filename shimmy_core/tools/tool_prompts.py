"""How tools, tool calls and tool results reach the model.

A chat template that knows tools (Hugging Face templates read a ``tools`` variable, and render
assistant ``tool_calls`` and ``tool`` messages themselves) gets them as they are: that is the format
the model was trained on.  A template that knows no tools gets the same information as text (the
*generic instruction*): a system message listing the tools and asking for
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, earlier calls written the same way
into the assistant messages, and results as ``<tool_response>`` user messages.

Backends call :func:`render_chat` from ``prepare()`` (and set ``renders_tools = True``); for a
backend that does not, the core applies :func:`generic_messages` before handing it the messages.
"""

from __future__ import annotations

import json
import weakref
from typing import Any, Sequence

_PROBE_NAME = "shimmy_probe_tool_7f3a"
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": _PROBE_NAME, "description": "probe", "parameters": {"type": "object", "properties": {}}}}]
_supports: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def template_supports_tools(template) -> bool:
    """Whether a :class:`~shimmy_core.chat_template.ChatTemplate` renders the ``tools`` it is given
    (checked once per template by rendering a probe tool)."""
    known = _supports.get(template)
    if known is None:
        try:
            text = template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tools=_PROBE_TOOLS)
            known = _PROBE_NAME in text
        except Exception:
            known = False
        _supports[template] = known
    return known


def instruction(tools: Sequence[dict], choice: str | None = None) -> str:
    """The generic instruction: the tools as JSON and how to call them.  ``choice`` is
    ``"required"`` or a tool name when the request insists on a call."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    lines = [
        "You can call functions (tools) to help answer the user. They are described here, as JSON Schema:",
        "<tools>",
        listing,
        "</tools>",
        "To call a function, reply with only a JSON object with its name and arguments, between tags:",
        "<tool_call>",
        '{"name": "<function name>", "arguments": {<arguments as JSON>}}',
        "</tool_call>",
        "The result comes back between <tool_response> tags. If no function is needed, answer normally.",
    ]
    if choice == "required":
        lines.append("You must call at least one function now.")
    elif choice:
        lines.append(f"You must call the function {choice} now.")
    return "\n".join(lines)


def _arguments_dict(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _call_text(call: dict) -> str:
    function = call.get("function") or {}
    body = {"name": function.get("name"), "arguments": _arguments_dict(function.get("arguments", {}))}
    return "<tool_call>\n" + json.dumps(body, ensure_ascii=False) + "\n</tool_call>"


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def generic_messages(messages: Sequence[dict], tools: Sequence[dict] | None, choice: str | None = None) -> list[dict]:
    """The messages with the tools, the calls and the results written as text, for a template that
    knows no tools.  Consecutive tool results become one user message."""
    out: list[dict] = []
    if tools:
        note = instruction(tools, choice)
        if messages and messages[0].get("role") == "system":
            first = dict(messages[0])
            first["content"] = (_content_text(first.get("content")) + "\n\n" + note).strip()
            out.append(first)
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": note})
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            text = _content_text(message.get("content"))
            calls = "\n".join(_call_text(c) for c in message["tool_calls"] if isinstance(c, dict))
            out.append({"role": "assistant", "content": (text + "\n" + calls).strip()})
        elif role in ("tool", "function"):
            result = "<tool_response>\n" + _content_text(message.get("content")) + "\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "_tool_results": True})
        else:
            out.append({k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")})
    for message in out:
        message.pop("_tool_results", None)
    return out


def native_messages(messages: Sequence[dict]) -> list[dict]:
    """The messages for a template that knows tools: arguments as objects (templates apply
    ``tojson`` to them) and a ``name`` on tool results, as Hugging Face templates expect."""
    names: dict[str, str] = {}
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                if not isinstance(call, dict):
                    continue
                function = dict(call.get("function") or {})
                function["arguments"] = _arguments_dict(function.get("arguments", {}))
                names[str(call.get("id"))] = str(function.get("name"))
                calls.append({**call, "function": function})
            message["tool_calls"] = calls
        if message.get("role") == "tool" and "name" not in message and message.get("tool_call_id") in names:
            message["name"] = names[message["tool_call_id"]]
        out.append(message)
    return out


def needs_rewrite(messages: Sequence[dict]) -> bool:
    return any(m.get("tool_calls") or m.get("role") in ("tool", "function") for m in messages)


def render_chat(template, messages: Sequence[dict], tools: Sequence[dict] | None = None, **kwargs: Any) -> str:
    """Render ``messages`` (and ``tools``) with a backend's chat template: natively when the
    template knows tools, else with the generic instruction.  Raises the template's TemplateError."""
    messages = list(messages)
    if (tools or needs_rewrite(messages)) and template_supports_tools(template):
        return template.render(native_messages(messages), tools=list(tools) if tools else None, **kwargs)
    if tools or needs_rewrite(messages):
        messages = generic_messages(messages, tools)
    return template.render(messages, **kwargs)
