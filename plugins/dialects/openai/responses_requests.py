"""Parse and validate a Responses API body (``POST /v1/responses`` and ``/v1/responses/input_tokens``)
into the neutral request: the input items, normalized as they are stored and listed, the chat
messages the model sees, the tools, the output format and the sampling.

Every client mistake is a 400 whose ``param`` names the path (``input[2].content[0].text``,
``tools[1].type``); hosted tool types Shimmy does not have are refused by name, never ignored.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from shimmy_core.plugin_api import (
    BodySchema,
    check_body,
    check_strings,
    check_text,
    GenerationRequest,
    OutputFormat,
    ParsedRequest,
    ReasoningOptions,
    RequestedTool,
    SamplingParams,
    ToolRequest,
    UnsupportedOutputSchema,
)
from shimmy_plugins.dialects.openai.openai_errors import APIError, invalid
from shimmy_plugins.dialects.openai.openai_requests import add_tool, answer_schema, check_tool_choice, finite

MAX_INPUT_ITEMS = 4096
_INT32 = 2**31 - 1
# The hosted tools of OpenAI's Responses API, which run on OpenAI's side: Shimmy has none of them.
HOSTED_TOOLS = frozenset({
    "file_search", "computer", "computer_use", "computer_use_preview", "web_search", "web_search_2025_08_26",
    "web_search_preview", "web_search_preview_2025_03_11", "mcp", "code_interpreter", "image_generation",
    "tool_search", "programmatic_tool_calling",
})
# Tools the client runs whose calls are not JSON arguments (free text, shell commands, patches).
UNSUPPORTED_TOOLS = frozenset({"custom", "local_shell", "shell", "apply_patch"})
INCLUDE = frozenset({
    "file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
    "message.input_image.image_url", "computer_call_output.output.image_url", "code_interpreter_call.outputs",
    "reasoning.encrypted_content", "message.output_text.logprobs",
})
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")

_NAME = {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}
_NULLABLE_OBJECT = {"type": ["object", "null"]}
_INPUT = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "maxItems": MAX_INPUT_ITEMS, "items": {"type": "object"}},
    ]
}
_SAMPLING = {
    "model": {"type": "string", "minLength": 1},
    "input": _INPUT,
    "instructions": {"type": ["string", "null"]},
    "previous_response_id": {"type": ["string", "null"]},
    "tools": {"type": ["array", "null"], "maxItems": 128,
              "items": {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}},
    "tool_choice": {"anyOf": [{"type": "null"}, {"enum": ["none", "auto", "required"]},
                              {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}]},
    "parallel_tool_calls": {"type": ["boolean", "null"]},
    "text": {
        "type": ["object", "null"],
        "properties": {
            "format": {
                "type": ["object", "null"],
                "required": ["type"],
                "properties": {
                    "type": {"enum": ["text", "json_object", "json_schema"]},
                    "name": _NAME,
                    "description": {"type": "string"},
                    "schema": {"type": ["object", "boolean"]},
                    "strict": {"type": ["boolean", "null"]},
                },
            },
            "verbosity": {"enum": ["low", "medium", "high", None]},
        },
    },
    "reasoning": {
        "type": ["object", "null"],
        "properties": {"effort": {"enum": [*EFFORTS, None]},
                       "summary": {"enum": ["auto", "concise", "detailed", None]}},
    },
    "truncation": {"enum": ["auto", "disabled", None]},
}
CREATE_SCHEMA = {
    "type": "object",
    "required": ["model"],
    "properties": {
        **_SAMPLING,
        "max_output_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": _INT32},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
        "metadata": {"type": ["object", "null"], "maxProperties": 16,
                     "propertyNames": {"maxLength": 64},
                     "additionalProperties": {"type": "string", "maxLength": 512}},
        "store": {"type": ["boolean", "null"]},
        "include": {"type": ["array", "null"], "items": {"enum": sorted(INCLUDE)}},
        "user": {"type": ["string", "null"]},
        "stream": {"type": ["boolean", "null"]},
        "stream_options": _NULLABLE_OBJECT,
        "background": {"type": ["boolean", "null"]},
        "max_tool_calls": {"type": ["integer", "null"], "minimum": 1},
    },
}
COUNT_SCHEMA = {"type": "object", "required": ["model"], "properties": _SAMPLING}
_CREATE = BodySchema(CREATE_SCHEMA)
_COUNT = BodySchema(COUNT_SCHEMA)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class ResponsesRequest:
    """A validated Responses body: the neutral request plus what the Response object echoes."""

    parsed: ParsedRequest
    items: list[dict]                  # this request's input items, normalized (with ids)
    context: list[dict]                # the stored conversation it continues (previous_response_id)
    echo: dict = field(default_factory=dict)   # the request's settings, as the Response repeats them
    store: bool = True
    logprobs: bool = False
    namespaces: dict[str, str] = field(default_factory=dict)   # function name -> its namespace tool


# ------------------------------------------------------------------ input items
def _text_parts(content: Any, param: str, role: str) -> str:
    """The text of a message's ``content``: a string or text parts; other parts are refused."""
    if isinstance(content, str):
        return check_text(content, param)
    if not isinstance(content, list):
        raise invalid(f"Invalid type for '{param}': expected a string or a list of content parts.", param=param)
    texts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        key = "refusal" if kind == "refusal" else "text"
        if kind not in ("input_text", "output_text", "refusal", "text"):
            raise invalid(f"Unsupported content part type {kind!r} in a {role} message: this server accepts "
                          "text parts only (input_text, output_text).", param=f"{where}.type")
        if not isinstance(part.get(key), str):
            raise invalid(f"Missing required parameter: '{where}.{key}'.", param=f"{where}.{key}")
        texts.append(check_text(part[key], f"{where}.{key}"))
    return "".join(texts)


def _string(item: dict, key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise invalid(f"Missing required parameter: '{param}.{key}' (a string).", param=f"{param}.{key}")
    return check_text(value, f"{param}.{key}")


def _message(item: dict, param: str) -> dict:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise invalid(f"Invalid value for '{param}.role': {role!r}; expected user, system, developer or assistant.",
                      param=f"{param}.role")
    if "content" not in item:
        raise invalid(f"Missing required parameter: '{param}.content'.", param=f"{param}.content")
    text = _text_parts(item["content"], f"{param}.content", role)
    if role == "assistant":
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "message", "id": item.get("id") or new_id("msg"), "role": role, "status": "completed",
                "content": [part]}
    return {"type": "message", "id": item.get("id") or new_id("msg"), "role": role, "status": "completed",
            "content": [{"type": "input_text", "text": text}]}


def _reasoning(item: dict, param: str) -> dict:
    """A reasoning item, kept as sent (text parts only) and left out of the prompt."""
    out: dict = {"type": "reasoning", "id": item.get("id") or new_id("rs"), "summary": []}
    for key, kind in (("summary", "summary_text"), ("content", "reasoning_text")):
        parts = item.get(key)
        if parts is None:
            continue
        if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                  for p in parts):
            raise invalid(f"Invalid value for '{param}.{key}': expected a list of text parts.", param=f"{param}.{key}")
        out[key] = [{"type": kind, "text": check_text(p["text"], f"{param}.{key}")} for p in parts]
    if isinstance(item.get("encrypted_content"), str):
        out["encrypted_content"] = item["encrypted_content"]
    return out


def _item(item: dict, param: str) -> dict:
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        return _message(item, param)
    if kind == "function_call":
        call = {"type": "function_call", "id": item.get("id") or new_id("fc"),
                "call_id": _string(item, "call_id", param), "name": _string(item, "name", param),
                "arguments": _string(item, "arguments", param), "status": "completed"}
        if isinstance(item.get("namespace"), str):
            call["namespace"] = item["namespace"]
        return call
    if kind == "function_call_output":
        output = item.get("output")
        if not isinstance(output, str):
            output = _text_parts(output, f"{param}.output", "function_call_output")
        return {"type": "function_call_output", "id": item.get("id") or new_id("fco"),
                "call_id": _string(item, "call_id", param), "output": check_text(output, f"{param}.output"),
                "status": "completed"}
    if kind == "reasoning":
        return _reasoning(item, param)
    if kind == "mcp_call" and item.get("server_label") == "shimmy":  # a call this server ran, sent back
        output, error = item.get("output"), item.get("error")
        out = {"type": "mcp_call", "id": _string(item, "id", param), "server_label": "shimmy",
               "name": _string(item, "name", param), "arguments": _string(item, "arguments", param),
               "output": output if isinstance(output, str) else None,
               "error": error if isinstance(error, dict) else None,
               "status": "failed" if isinstance(error, dict) else "completed"}
        check_strings(out, param)
        return out
    if kind == "item_reference":
        raise invalid("Input items of type 'item_reference' are not supported: send the item itself, or "
                      "continue a stored response with 'previous_response_id'.", param=f"{param}.type",
                      code="unsupported_value")
    raise invalid(f"Input items of type {kind!r} are not supported: this server takes messages, function_call, "
                  "function_call_output and reasoning items.", param=f"{param}.type", code="unsupported_value")


def input_items(raw: Any) -> list[dict]:
    """The ``input`` of a body as normalized items (each with an ``id``, as they are listed)."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [_message({"role": "user", "content": raw}, "input")]
    return [_item(item, f"input[{i}]") for i, item in enumerate(raw)]


def chat_messages(instructions: str | None, items: list[dict]) -> list[dict]:
    """The conversation as chat messages for the template: instructions first, developer messages
    as system, calls on the assistant message before them, outputs as tool messages; reasoning
    items are left out (templates drop earlier turns' thinking)."""
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    names: dict[str, str] = {}
    for item in items:
        kind = item["type"]
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": "".join(p["text"] for p in item["content"])})
        elif kind in ("function_call", "mcp_call"):
            call_id = item.get("call_id") or item["id"]
            names[call_id] = item["name"]
            call = {"id": call_id, "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                last["content"] = last["content"] or None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            if kind == "mcp_call":
                error = item["error"] or {}
                output = item["output"] if item["output"] is not None else f"error: {error.get('content', '')}"
                messages.append({"role": "tool", "tool_call_id": call_id, "name": item["name"], "content": output})
        elif kind == "function_call_output":
            message = {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
            if item["call_id"] in names:
                message["name"] = names[item["call_id"]]
            messages.append(message)
    return messages


# ------------------------------------------------------------------ tools and formats
def _refuse_tool_type(kind: str, param: str) -> None:
    if kind in HOSTED_TOOLS:
        raise invalid(f"Tools of type {kind!r} are not supported: Shimmy has no hosted {kind} tool. It takes "
                      "function tools, and runs the server-side tools GET /v1/tools lists when they are enabled.",
                      param=param, code="unsupported_tool")
    if kind in UNSUPPORTED_TOOLS:
        raise invalid(f"Tools of type {kind!r} are not supported by this server: it takes function tools "
                      "(JSON arguments), alone or in a namespace.", param=param, code="unsupported_tool")
    raise invalid(f"Invalid value for '{param}': {kind!r} is not a tool type.", param=param, code="invalid_value")


def _function(tool: dict, param: str, requested: list[RequestedTool]) -> dict:
    """Check a function tool, add it to ``requested``; the tool as the Response echoes it."""
    name = tool.get("name")
    if not isinstance(name, str) or not _valid_name(name):
        raise invalid(f"Invalid value for '{param}.name': a function name is 1 to 64 letters, digits, '_' "
                      "or '-'.", param=f"{param}.name", code="invalid_value")
    for key, kinds in (("description", str), ("parameters", dict), ("strict", bool)):
        if tool.get(key) is not None and not isinstance(tool[key], kinds):
            raise invalid(f"Invalid type for '{param}.{key}'.", param=f"{param}.{key}", code="invalid_value")
    add_tool(requested, name, tool.get("description"), tool.get("parameters"), param)
    return {"type": "function", "name": name, "description": tool.get("description"),
            "parameters": tool.get("parameters"), "strict": tool.get("strict") if tool.get("strict") is not None else True}


def _tools(body: dict) -> tuple[list[RequestedTool], list[dict], dict[str, str]]:
    """The function tools (checked), the ``tools`` the Response echoes, and the namespace of each
    function that came in a ``namespace`` tool (the model sees every function by its own name)."""
    requested: list[RequestedTool] = []
    echoed: list[dict] = []
    namespaces: dict[str, str] = {}
    for i, tool in enumerate(body.get("tools") or ()):
        kind, param = tool["type"], f"tools[{i}]"
        if kind == "function":
            echoed.append(_function(tool, param, requested))
        elif kind == "namespace":
            name, inner = tool.get("name"), tool.get("tools")
            if not isinstance(name, str) or not name or not isinstance(inner, list) or not inner:
                raise invalid(f"Invalid value for '{param}': a namespace has a 'name' and a list of 'tools'.",
                              param=param, code="invalid_value")
            functions = []
            for j, function in enumerate(inner):
                where = f"{param}.tools[{j}]"
                if not isinstance(function, dict) or function.get("type") != "function":
                    _refuse_tool_type(function.get("type") if isinstance(function, dict) else None, f"{where}.type")
                functions.append(_function(function, where, requested))
                namespaces[function["name"]] = name
            description = tool.get("description")
            echoed.append({"type": "namespace", "name": name,
                           "description": description if isinstance(description, str) else "", "tools": functions})
        else:
            _refuse_tool_type(kind, f"{param}.type")
    return requested, echoed, namespaces


def _valid_name(name: str) -> bool:
    return 1 <= len(name) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)


def _tool_choice(body: dict, requested: list[RequestedTool]) -> tuple[str, str | None, tuple[str, ...] | None, Any]:
    """``(choice, function, allowed, echo)`` of ``tool_choice``."""
    raw = body.get("tool_choice")
    if raw is None:
        choice = "auto" if requested else "none"
        return choice, None, None, choice
    if isinstance(raw, str):
        return raw, None, None, raw
    kind = raw["type"]
    if kind == "function":
        name = raw.get("name")
        if not isinstance(name, str):
            raise invalid("Missing required parameter: 'tool_choice.name'.", param="tool_choice.name")
        return "function", name, None, {"type": "function", "name": name}
    if kind == "allowed_tools":
        mode, tools = raw.get("mode"), raw.get("tools")
        if mode not in ("auto", "required"):
            raise invalid("Invalid value for 'tool_choice.mode': expected auto or required.", param="tool_choice.mode")
        if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function"
                                                  and isinstance(t.get("name"), str) for t in tools):
            raise invalid("Invalid value for 'tool_choice.tools': expected function tools by name "
                          "({\"type\": \"function\", \"name\": ...}).", param="tool_choice.tools")
        allowed = tuple(t["name"] for t in tools)
        return mode, None, allowed, {"type": "allowed_tools", "mode": mode,
                                     "tools": [{"type": "function", "name": n} for n in allowed]}
    if kind in HOSTED_TOOLS or kind.startswith(("web_search", "computer")):
        raise invalid(f"'tool_choice' names the hosted tool type {kind!r}, which Shimmy does not have.",
                      param="tool_choice.type", code="unsupported_tool")
    raise invalid(f"Invalid value for 'tool_choice.type': {kind!r}.", param="tool_choice.type", code="invalid_value")


def _text_format(body: dict) -> tuple[Any, dict]:
    """The answer's JSON Schema (``None``: free text) and the ``text`` the Response echoes."""
    text = body.get("text") or {}
    fmt = text.get("format") or {"type": "text"}
    kind = fmt["type"]
    if kind == "json_schema":
        for key in ("name", "schema"):
            if key not in fmt:
                raise invalid(f"Missing required parameter: 'text.format.{key}'.", param=f"text.format.{key}",
                              code="invalid_value")
        fmt = {"type": "json_schema", "name": fmt["name"], "schema": fmt["schema"],
               "strict": bool(fmt.get("strict") or False), **({"description": fmt["description"]}
                                                                if "description" in fmt else {})}
    else:
        fmt = {"type": kind}
    echo = {"format": fmt, "verbosity": text.get("verbosity") or "medium"}
    return answer_schema(kind, fmt.get("schema"), "text.format.schema"), echo


def unsupported_schema(exc: UnsupportedOutputSchema, body: dict) -> APIError:
    """A schema the backend cannot enforce, worded for the Responses body's fields."""
    if exc.tool is not None:
        index = next((i for i, t in enumerate(body.get("tools") or ())
                      if isinstance(t, dict) and t.get("name") == exc.tool), 0)
        return invalid(f"The parameters of function {exc.tool!r} cannot be enforced: {exc.detail}.",
                       param=f"tools[{index}].parameters", code="unsupported_schema")
    name = ((body.get("text") or {}).get("format") or {}).get("name")
    return invalid(f"Invalid schema for text.format {name!r}: {exc.detail}.", param="text.format.schema",
                   code="unsupported_schema")


# ------------------------------------------------------------------ the whole body
def _refuse_unsupported(body: dict) -> None:
    if body.get("background"):
        raise invalid("Background responses are not supported: send the request and wait, or stream it.",
                      param="background", code="unsupported_value")
    for key, why in (("conversation", "use 'previous_response_id' or send the whole input"),
                     ("prompt", "send the prompt's text as 'instructions' and 'input'")):
        if body.get(key) is not None:
            raise invalid(f"'{key}' is not supported by this server: {why}.", param=key, code="unsupported_value")


def parse_responses_request(body: dict, context: list[dict], count_only: bool = False,
                            defaults: Mapping[str, float] = {}) -> ResponsesRequest:
    """Validate ``body``; ``context`` is the stored conversation ``previous_response_id`` names
    (its input and output items), already looked up by the caller; ``defaults``: the server's
    sampling defaults (``Settings.sampling_defaults``) for what the body leaves out."""
    check_body(_COUNT if count_only else _CREATE, body)
    _refuse_unsupported(body)
    for key in ("max_output_tokens", "top_logprobs"):
        if body.get(key) is not None:
            body[key] = int(body[key])  # JSON Schema counts 2.0 as an integer
    instructions = body.get("instructions")
    if instructions is not None:
        check_text(instructions, "instructions")
    items = input_items(body.get("input"))
    if body.get("metadata"):
        check_strings(body["metadata"], "metadata")

    requested, tools_echo, namespaces = _tools(body)
    choice, function, allowed, choice_echo = _tool_choice(body, requested)
    check_tool_choice(requested, choice, function, allowed, "tool_choice.name", "tool_choice.tools")
    schema, text_echo = _text_format(body)
    tools = ToolRequest(tuple(requested), choice, function, allowed, body.get("parallel_tool_calls"), schema)

    include = body.get("include") or []
    logprobs = "message.output_text.logprobs" in include
    params = SamplingParams(
        max_tokens=body.get("max_output_tokens"),
        temperature=finite(body, "temperature", defaults.get("temperature", 1.0)),
        top_p=finite(body, "top_p", defaults.get("top_p", 1.0)),
        top_k=int(defaults.get("top_k", 0)),
        min_p=defaults.get("min_p", 0.0),
        logprobs=logprobs,
        top_logprobs=(body.get("top_logprobs") or 0) if logprobs else 0,
    )
    if schema is not None:
        params = dataclasses.replace(params, output=OutputFormat(answer=schema))
    effort = (body.get("reasoning") or {}).get("effort")
    reasoning = ReasoningOptions(effort={"xhigh": "high", "max": "high"}.get(effort, effort)) if effort else None
    messages = chat_messages(instructions, [*context, *items])
    if not messages:
        raise invalid("Missing required parameter: 'input' (the conversation is empty).", param="input")
    prompt = GenerationRequest(messages=tuple(messages), params=params, reasoning=reasoning)
    parsed = ParsedRequest(kind="chat", model=body["model"], prompts=(prompt,), n=1,
                           stream=bool(body.get("stream") or False), include_usage=False, echo=False, tools=tools)
    echo = {
        "instructions": instructions,
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": effort, "summary": (body.get("reasoning") or {}).get("summary")},
        "temperature": params.temperature,
        "text": text_echo,
        "tool_choice": choice_echo,
        "tools": tools_echo,
        "top_p": params.top_p,
        "top_logprobs": body.get("top_logprobs") or 0,
        "truncation": body.get("truncation") or "disabled",
        "user": body.get("user"),
    }
    return ResponsesRequest(parsed, items, context, echo, store=body.get("store") is not False, logprobs=logprobs,
                            namespaces=namespaces)


def truncated(parsed: ParsedRequest) -> ParsedRequest | None:
    """``truncation: auto``: the request without its oldest turn (a user message and what answered
    it, up to the next user message; instructions and system messages stay), or ``None`` when
    only the last turn is left."""
    messages = list(parsed.prompts[0].messages or ())
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if first is None:
        return None
    end = next((i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user"), None)
    if end is None:
        return None
    prompt = dataclasses.replace(parsed.prompts[0], messages=tuple(messages[:first] + messages[end:]))
    return dataclasses.replace(parsed, prompts=(prompt,))
