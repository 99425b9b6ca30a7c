"""Validate Anthropic Messages bodies and translate them into the neutral request.

Content blocks become the chat messages every backend takes: text blocks are joined into one
message, ``tool_use`` blocks become the assistant's tool calls, ``tool_result`` blocks become tool
messages (``is_error`` written into the result, as models read it), ``thinking`` blocks the
assistant's reasoning; ``redacted_thinking`` is dropped.  Images and documents are refused with a
400, since no backend takes them yet.  Unknown top-level fields are ignored (clients such as Claude
Code send beta fields); unknown block types are refused.
"""

from __future__ import annotations

import json
from typing import Mapping

from shimmy_core.plugin_api import BodySchema, check_body, check_schema, check_strings, check_text, GenerationRequest
from shimmy_core.plugin_api import InvalidRequest, ParsedRequest, ReasoningOptions, RequestedTool, SamplingParams
from shimmy_core.plugin_api import SchemaProblem, ToolRequest

MAX_TOOLS = 128
MAX_STOP_SEQUENCES = 64
_INT32 = 2**31 - 1
_TEXT_BLOCK = {"type": "object", "required": ["type", "text"],
               "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_BLOCK = {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}
_CONTENT = {"anyOf": [{"type": "string"}, {"type": "array", "items": _BLOCK}]}

MESSAGES_SCHEMA = {
    "type": "object",
    "required": ["model", "messages", "max_tokens"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": _INT32},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {"role": {"enum": ["user", "assistant", "system"]}, "content": _CONTENT},
            },
        },
        "system": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_BLOCK}]},
        "stop_sequences": {"type": "array", "maxItems": MAX_STOP_SEQUENCES, "items": {"type": "string"}},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
        "metadata": {"type": "object"},
        "stream": {"type": "boolean"},
        "tools": {
            "type": "array",
            "maxItems": MAX_TOOLS,
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "type": {"type": "string"},
                    "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,128}$"},
                    "description": {"type": "string"},
                    "input_schema": {"type": "object"},
                },
            },
        },
        "tool_choice": {
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"enum": ["auto", "any", "tool", "none"]},
                "name": {"type": "string"},
                "disable_parallel_tool_use": {"type": "boolean"},
            },
        },
        "output_config": {"type": "object", "properties": {"effort": {"enum": ["low", "medium", "high", "max"]}}},
        "thinking": {
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"enum": ["enabled", "disabled", "adaptive"]},
                "budget_tokens": {"type": "integer", "minimum": 0, "maximum": _INT32},
            },
        },
    },
}
# count_tokens takes the same body without max_tokens (and without sampling, which it ignores)
COUNT_SCHEMA = {**MESSAGES_SCHEMA, "required": ["model", "messages"]}
_VALIDATORS = {"messages": BodySchema(MESSAGES_SCHEMA), "count": BodySchema(COUNT_SCHEMA)}
_UNSUPPORTED_MEDIA = ("image", "document", "search_result", "container_upload")


def _refuse_block(kind: str, param: str) -> InvalidRequest:
    if kind in _UNSUPPORTED_MEDIA:
        return InvalidRequest(f"{param}: {kind} blocks are not supported: the models this server runs take text "
                              "only (no vision or documents yet).", param=param, code="unsupported_content")
    return InvalidRequest(f"{param}: content blocks of type {kind!r} are not supported here; this server takes "
                          "text, tool_use, tool_result, thinking and redacted_thinking blocks.", param=param,
                          code="unsupported_content")


def _text_of(block: dict, param: str) -> str:
    if not isinstance(block.get("text"), str):
        raise InvalidRequest(f"{param}.text: a text block needs a string 'text'.", param=f"{param}.text")
    return check_text(block["text"], f"{param}.text")


def _texts(content, param: str) -> str:
    """A string, or the text blocks of a list (system prompts, tool results), joined."""
    if isinstance(content, str):
        return check_text(content, param)
    parts = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _refuse_block(block.get("type") if isinstance(block, dict) else type(block).__name__,
                                f"{param}.{j}")
        parts.append(_text_of(block, f"{param}.{j}"))
    return "\n\n".join(parts)


def _tool_result(block: dict, param: str) -> dict:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest(f"{param}.tool_use_id: a tool_result block needs the id of its tool_use.",
                             param=f"{param}.tool_use_id")
    content = block.get("content", "")
    if not isinstance(content, (str, list)):
        raise InvalidRequest(f"{param}.content: a string or a list of text blocks.", param=f"{param}.content")
    text = _texts(content, f"{param}.content")
    if block.get("is_error"):
        text = "Error: " + text
    return {"role": "tool", "tool_call_id": check_text(call_id, f"{param}.tool_use_id"), "content": text}


def _tool_call(block: dict, param: str) -> dict:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(arguments, dict):
        raise InvalidRequest(f"{param}: a tool_use block needs a string 'id', a string 'name' and an object "
                             "'input'.", param=param)
    check_strings(block, param)
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _messages(message: dict, i: int) -> list[dict]:
    """One Anthropic message as neutral chat messages (tool results first, as their own messages)."""
    role, content, param = message["role"], message["content"], f"messages.{i}.content"
    if isinstance(content, str):
        return [{"role": role, "content": check_text(content, param)}]
    texts: list[str] = []
    calls: list[dict] = []
    results: list[dict] = []
    reasoning: list[str] = []
    for j, block in enumerate(content):
        kind, where = block["type"], f"{param}.{j}"
        if kind == "text":
            texts.append(_text_of(block, where))
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block, where))
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_call(block, where))
        elif kind == "thinking" and role == "assistant":
            reasoning.append(check_text(str(block.get("thinking") or ""), f"{where}.thinking"))
        elif kind == "redacted_thinking" and role == "assistant":
            continue
        elif kind in ("tool_result", "tool_use", "thinking", "redacted_thinking"):
            raise InvalidRequest(f"{where}: {kind} blocks belong in {'an assistant' if kind != 'tool_result' else 'a user'} "
                                 "message.", param=where)
        else:
            raise _refuse_block(kind, where)
    out = list(results)
    if texts or calls or reasoning or not results:
        item: dict = {"role": role, "content": "\n\n".join(texts)}
        if calls:
            item["tool_calls"] = calls
        if reasoning:
            item["reasoning_content"] = "\n\n".join(reasoning)
        out.append(item)
    return out


def _tool_request(body: dict) -> ToolRequest:
    requested: list[RequestedTool] = []
    for i, tool in enumerate(body.get("tools") or ()):
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise InvalidRequest(f"tools.{i}.type: {kind!r} is one of Anthropic's server tools, which this server "
                                 "does not have; describe the tool with name, description and input_schema.",
                                 param=f"tools.{i}.type")
        if "input_schema" not in tool:
            raise InvalidRequest(f"tools.{i}.input_schema: Field required", param=f"tools.{i}.input_schema")
        try:
            check_schema(tool["input_schema"])
        except SchemaProblem as exc:
            raise InvalidRequest(f"tools.{i}.input_schema: invalid JSON Schema: {exc}.",
                                 param=f"tools.{i}.input_schema", code="invalid_schema") from None
        if tool.get("description") is not None:
            check_text(tool["description"], f"tools.{i}.description")
        if any(t.name == tool["name"] for t in requested):
            raise InvalidRequest(f"tools: tool names must be unique; {tool['name']!r} is there twice.",
                                 param=f"tools.{i}.name")
        requested.append(RequestedTool(tool["name"], tool.get("description"), tool["input_schema"], i))
    choice_body = body.get("tool_choice") or {"type": "auto"}
    kind = choice_body["type"]
    choice = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}[kind]
    function = choice_body.get("name") if kind == "tool" else None
    if kind == "tool" and function not in {t.name for t in requested}:
        raise InvalidRequest(f"tool_choice.name: {function!r} is not one of the tools.", param="tool_choice.name")
    if choice in ("required", "function") and not requested:
        raise InvalidRequest("tool_choice: a tool is forced but no tools are given.", param="tool_choice")
    if not requested:
        choice = "none"
    parallel = not choice_body.get("disable_parallel_tool_use", False)
    return ToolRequest(tuple(requested), choice, function, None, parallel)


def _reasoning(body: dict) -> ReasoningOptions | None:
    """``thinking`` as reasoning options: disabled turns thinking off, enabled turns it on with its
    budget (and an effort for templates that take one), adaptive (or none given) leaves it to the
    model, with ``output_config.effort`` when there is one."""
    thinking = body.get("thinking")
    effort = (body.get("output_config") or {}).get("effort")
    if thinking is None or thinking["type"] == "adaptive":
        return ReasoningOptions("high" if effort == "max" else effort) if effort else None
    if thinking["type"] == "disabled":
        return ReasoningOptions("none")
    budget = thinking.get("budget_tokens")
    if budget is None:
        raise InvalidRequest("thinking.budget_tokens: Field required", param="thinking.budget_tokens")
    if "max_tokens" in body and budget >= body["max_tokens"]:
        raise InvalidRequest("max_tokens must be greater than thinking.budget_tokens.", param="thinking.budget_tokens")
    effort = "low" if budget < 4096 else "medium" if budget < 16384 else "high"
    return ReasoningOptions(effort, budget)


def parse_request(body: dict, max_tokens_ceiling: int, counting: bool = False,
                  defaults: Mapping[str, float] = {}) -> ParsedRequest:
    """Validate a Messages body (``counting``: a count_tokens body) into the neutral request;
    ``defaults``: the server's sampling defaults (``Settings.sampling_defaults``) for what it leaves out.

    ``max_tokens`` above the server's ceiling is taken as the ceiling (every answer is capped
    there anyway), so that clients asking for a large budget (Claude Code asks for 32,000) are
    checked against the context window for what they can get."""
    check_body(_VALIDATORS["count" if counting else "messages"], body)
    system = [_texts(body["system"], "system")] if body.get("system") else []
    messages: list[dict] = []
    for i, message in enumerate(body["messages"]):
        if message["role"] == "system":  # Claude Code sends some; templates take one system prompt, first
            system.append(_texts(message["content"], f"messages.{i}.content"))
        else:
            messages += _messages(message, i)
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(s for s in system if s)})
    last = body["messages"][-1]
    if last["role"] == "assistant" and not counting:
        raise InvalidRequest("messages: the last message must come from the user; a final assistant message "
                             "(a prefill to continue) is not supported by this server.", param="messages")
    stops = tuple(check_text(s, "stop_sequences") for s in body.get("stop_sequences") or () if s)
    requested = body.get("max_tokens")
    params = SamplingParams(
        max_tokens=min(int(requested), max_tokens_ceiling) if requested is not None else 1,
        temperature=float(body.get("temperature", defaults.get("temperature", 1.0))),
        top_p=float(body.get("top_p", defaults.get("top_p", 1.0))),
        top_k=int(body.get("top_k", defaults.get("top_k", 0))),
        min_p=float(defaults.get("min_p", 0.0)),
        stop=stops,
    )
    return ParsedRequest(
        kind="chat",
        model=body["model"],
        prompts=(GenerationRequest(messages=tuple(messages), params=params, reasoning=_reasoning(body)),),
        n=1,
        stream=bool(body.get("stream", False)),
        include_usage=True,
        echo=False,
        tools=_tool_request(body),
    )
