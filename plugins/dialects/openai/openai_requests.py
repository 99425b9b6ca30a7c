"""Parse and validate OpenAI request bodies into neutral generation requests.

Every client mistake becomes a 400 with ``param`` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from shimmy_core.plugin_api import (
    BodySchema,
    check_body,
    check_schema,
    check_strings,
    check_text,
    GenerationRequest,
    OutputFormat,
    parse_json,
    ParsedRequest,
    ReasoningOptions,
    RequestedTool,
    SamplingParams,
    SchemaProblem,
    ToolRequest,
    UnsupportedOutputSchema,
)
from shimmy_plugins.dialects.openai.openai_errors import APIError, invalid

MAX_STOP = 16
_INT32 = 2**31 - 1

_NUMBER = {"type": "number"}
_TEXT_PART = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"type": "string"}, "text": {"type": "string"}},
}
_COMMON = {
    "model": {"type": "string", "minLength": 1},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": _INT32},
    "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": _INT32},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
    "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "top_k": {"type": ["integer", "null"], "minimum": 0, "maximum": 1_000_000},
    "min_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 128},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {
        "type": ["object", "null"],
        "properties": {"include_usage": {"type": "boolean"}},
    },
    "stop": {
        "anyOf": [
            {"type": "null"},
            {"type": "string"},
            {"type": "array", "maxItems": MAX_STOP, "items": {"type": "string"}},
        ]
    },
    "seed": {"type": ["integer", "null"], "minimum": -(2**63), "maximum": 2**64 - 1},
    "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
    "logit_bias": {
        "type": ["object", "null"],
        "maxProperties": 1024,
        "propertyNames": {"pattern": "^[0-9]{1,10}$"},
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
    },
    "user": {"type": ["string", "null"]},
}

MAX_TOOLS = 128
_FUNCTION_NAME = {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}
_FUNCTION_REF = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
    },
}
_TOOL_CALL = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
        },
    },
}
_TOOLS = {
    "type": ["array", "null"],
    "maxItems": MAX_TOOLS,
    "items": {
        "type": "object",
        "required": ["type"],  # "function" is checked after "type", so that other tool types are named
        "properties": {
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": _FUNCTION_NAME,
                    "description": {"type": "string"},
                    "parameters": {"type": "object"},
                    "strict": {"type": ["boolean", "null"]},
                },
            },
        },
    },
}
_TOOL_CHOICE = {
    "anyOf": [
        {"type": "null"},
        {"enum": ["none", "auto", "required"]},
        _FUNCTION_REF,
        {
            "type": "object",
            "required": ["type", "allowed_tools"],
            "properties": {
                "type": {"const": "allowed_tools"},
                "allowed_tools": {
                    "type": "object",
                    "required": ["mode", "tools"],
                    "properties": {"mode": {"enum": ["auto", "required"]}, "tools": {"type": "array", "items": _FUNCTION_REF}},
                },
            },
        },
    ]
}
_RESPONSE_FORMAT = {
    "anyOf": [
        {"type": "null"},
        {
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"enum": ["text", "json_object", "json_schema"]},
                "json_schema": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": _FUNCTION_NAME,
                        "description": {"type": "string"},
                        "schema": {"type": ["object", "boolean"]},
                        "strict": {"type": ["boolean", "null"]},
                    },
                },
            },
        },
    ]
}

CHAT_SCHEMA = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        **_COMMON,
        "messages": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4096,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {"enum": ["system", "developer", "user", "assistant", "tool", "function"]},
                    "content": {
                        "anyOf": [
                            {"type": "string"},
                            {"type": "null"},
                            {"type": "array", "items": _TEXT_PART},
                        ]
                    },
                    "name": {"type": "string"},
                    "tool_call_id": {"type": "string"},
                    "tool_calls": {"type": ["array", "null"], "maxItems": MAX_TOOLS, "items": _TOOL_CALL},
                    "reasoning_content": {"type": ["string", "null"]},
                },
            },
        },
        "logprobs": {"type": ["boolean", "null"]},
        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
        "tools": _TOOLS,
        "tool_choice": _TOOL_CHOICE,
        "parallel_tool_calls": {"type": ["boolean", "null"]},
        "response_format": _RESPONSE_FORMAT,
        # thinking models: the template's own switch, and llama-server's per-request budget
        "reasoning_effort": {"enum": [None, "none", "minimal", "low", "medium", "high", "xhigh", "max"]},
        "thinking_budget_tokens": {"type": ["integer", "null"], "minimum": -1, "maximum": _INT32},
    },
}

COMPLETION_SCHEMA = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        **_COMMON,
        "prompt": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "minItems": 1, "maxItems": 128, "items": {"type": "string"}},
            ]
        },
        "echo": {"type": ["boolean", "null"]},
        "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
        "suffix": {"type": ["string", "null"]},
        "best_of": {"type": ["integer", "null"], "minimum": 1, "maximum": 1},
    },
}

MAX_EMBEDDING_INPUTS = 2048   # OpenAI's limit on the inputs of one request
_TOKEN_ID = {"type": "integer", "minimum": 0, "maximum": _INT32}
EMBEDDING_SCHEMA = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": _COMMON["model"],
        "input": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS, "items": {"type": "string"}},
                {"type": "array", "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS, "items": _TOKEN_ID},
                {"type": "array", "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS,
                 "items": {"type": "array", "minItems": 1, "items": _TOKEN_ID}},
            ]
        },
        "encoding_format": {"enum": [None, "float", "base64"]},
        "dimensions": {"type": ["integer", "null"], "minimum": 1, "maximum": _INT32},
        "user": {"type": ["string", "null"]},
        "truncate": {"type": ["boolean", "null"]},  # Shimmy's extension: cut inputs over the model's context
    },
}

RERANK_SCHEMA = {
    "type": "object",
    "required": ["model", "query", "documents"],
    "properties": {
        "model": _COMMON["model"],
        "query": {"type": "string", "minLength": 1},
        "documents": {
            "type": "array", "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS,
            "items": {"anyOf": [{"type": "string"},
                                {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}]},
        },
        "top_n": {"type": ["integer", "null"], "minimum": 1, "maximum": _INT32},
        "return_documents": {"type": ["boolean", "null"]},
        "truncate": {"type": ["boolean", "null"]},
    },
}

_VALIDATORS = {
    "chat": BodySchema(CHAT_SCHEMA),
    "completion": BodySchema(COMPLETION_SCHEMA),
    "embedding": BodySchema(EMBEDDING_SCHEMA),
    "rerank": BodySchema(RERANK_SCHEMA),
}


def _message_text(message: dict, index: int) -> str | None:
    content = message.get("content")
    param = f"messages[{index}].content"
    if content is None:
        if message["role"] != "assistant":
            raise invalid(f"Missing content for a {message['role']} message.", param=param)
        return None
    if isinstance(content, str):
        return check_text(content, param)
    texts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise invalid(
                f"Unsupported content part type {part.get('type')!r}: this server accepts text parts only.",
                param=f"{param}[{j}]",
            )
        texts.append(check_text(part["text"], f"{param}[{j}].text"))
    return "".join(texts)


def finite(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not math.isfinite(value):  # pragma: no cover - NaN/Infinity are refused while parsing
        raise invalid(f"'{name}' must be a finite number.", param=name)
    return float(value)


def parse_request(kind: str, body: dict, max_n: int, defaults: Mapping[str, float] = {}) -> ParsedRequest:
    """Validate ``body`` (already JSON-decoded) for ``kind`` ("chat" or "completion"); ``defaults``:
    the server's sampling defaults (``Settings.sampling_defaults``) for what the body leaves out."""
    check_body(_VALIDATORS[kind], body)
    stream = bool(body.get("stream") or False)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    # JSON Schema counts 2.0 as an integer; the backends get real ints.
    for key in ("n", "max_tokens", "max_completion_tokens", "seed", "top_logprobs", "best_of", "thinking_budget_tokens"):
        if body.get(key) is not None:
            body[key] = int(body[key])
    if kind == "completion" and body.get("logprobs") is not None:
        body["logprobs"] = int(body["logprobs"])
    n = body.get("n") or 1
    if n > max_n:
        raise invalid(f"Invalid value for 'n': at most {max_n} choices per request.", param="n", code="invalid_value")

    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    stops = tuple(check_text(s, "stop") for s in stops if s)

    if kind == "chat":
        logprobs = bool(body.get("logprobs") or False)
        top = body.get("top_logprobs")
        if top is not None and not logprobs:
            raise invalid("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
        top_logprobs = top or 0
    else:
        lp = body.get("logprobs")
        logprobs, top_logprobs = lp is not None, lp or 0

    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=finite(body, "temperature", defaults.get("temperature", 1.0)),
        top_p=finite(body, "top_p", defaults.get("top_p", 1.0)),
        top_k=int(body["top_k"] if body.get("top_k") is not None else defaults.get("top_k", 0)),
        min_p=finite(body, "min_p", defaults.get("min_p", 0.0)),
        stop=stops,
        seed=body.get("seed"),
        presence_penalty=finite(body, "presence_penalty", 0.0),
        frequency_penalty=finite(body, "frequency_penalty", 0.0),
        logit_bias=tuple(sorted((int(k), float(v)) for k, v in (body.get("logit_bias") or {}).items())),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )

    tools = None
    if kind == "chat":
        tools = _tool_request(body)
        if tools.answer_schema is not None:
            params = dataclasses.replace(params, output=OutputFormat(answer=tools.answer_schema))
        messages = []
        for i, message in enumerate(body["messages"]):
            role = "system" if message["role"] == "developer" else message["role"]
            text = _message_text(message, i)
            # Templates concatenate content: a null content becomes "" unless tool calls explain it.
            item = {"role": role, "content": "" if text is None and not message.get("tool_calls") else text}
            for key in ("name", "tool_call_id", "reasoning_content"):
                if message.get(key) is not None:
                    item[key] = check_text(message[key], f"messages[{i}].{key}")
            if message.get("tool_calls"):
                check_strings(message["tool_calls"], f"messages[{i}].tool_calls")
                item["tool_calls"] = message["tool_calls"]
            messages.append(item)
        reasoning = None
        budget = body.get("thinking_budget_tokens")
        if budget is not None and budget >= 0 and n > 1:
            raise invalid("'thinking_budget_tokens' needs 'n' to be 1.", param="thinking_budget_tokens")
        if body.get("reasoning_effort") is not None or body.get("thinking_budget_tokens") is not None:
            reasoning = ReasoningOptions(body.get("reasoning_effort"), body.get("thinking_budget_tokens"))
        prompts = (GenerationRequest(messages=tuple(messages), params=params, reasoning=reasoning),)
    else:
        raw = body["prompt"]
        texts = [raw] if isinstance(raw, str) else raw
        prompts = tuple(
            GenerationRequest(prompt=check_text(t, "prompt"), params=params) for t in texts
        )
    return ParsedRequest(
        kind=kind,
        model=body["model"],
        prompts=prompts,
        n=n,
        stream=stream,
        include_usage=bool((options or {}).get("include_usage", False)),
        echo=bool(body.get("echo") or False) if kind == "completion" else False,
        tools=tools,
    )


def check_user_schema(schema, param: str) -> None:
    try:
        check_schema(schema)
    except SchemaProblem as exc:
        raise invalid(f"Invalid JSON Schema in '{param}': {exc}.", param=param, code="invalid_schema") from None


def add_tool(requested: list[RequestedTool], name: str, description, parameters, param: str) -> None:
    """Check one function definition (``param`` is its path) and add it to ``requested``."""
    if parameters is not None:
        check_user_schema(parameters, f"{param}.parameters")
    if description is not None:
        check_text(description, f"{param}.description")
    if any(t.name == name for t in requested):
        raise invalid(f"Duplicate function name {name!r} in 'tools'.", param=f"{param}.name")
    requested.append(RequestedTool(name, description, parameters, len(requested)))


def check_tool_choice(requested: list[RequestedTool], choice: str, function: str | None,
                      allowed: tuple[str, ...] | None, function_param: str, allowed_param: str) -> None:
    """The functions ``tool_choice`` names must be in ``tools``; forcing a call needs tools."""
    names = [t.name for t in requested]
    if function is not None and function not in names:
        raise invalid(f"'tool_choice' names the function {function!r}, which is not in 'tools'.",
                      param=function_param, code="invalid_value")
    unknown = [n for n in allowed or () if n not in names]
    if unknown:
        raise invalid(f"'tool_choice' allows {unknown[0]!r}, which is not in 'tools'.",
                      param=allowed_param, code="invalid_value")
    if choice in ("required", "function") and not requested:
        raise invalid("'tool_choice' is only allowed when 'tools' are given.", param="tool_choice")


def answer_schema(kind: str, schema, param: str):
    """The answer's JSON Schema for a format ``kind`` (text, json_object, json_schema), checked."""
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        check_user_schema(schema, param)
        return schema
    return None


def _tool_request(body: dict) -> ToolRequest:
    """The tool-related fields of a chat body (``response_format`` included), checked."""
    requested: list[RequestedTool] = []
    for i, tool in enumerate(body.get("tools") or ()):
        if "function" not in tool:
            raise invalid(f"Missing required parameter: 'tools[{i}].function'.", param=f"tools[{i}].function",
                          code="invalid_value")
        function = tool["function"]
        add_tool(requested, function["name"], function.get("description"), function.get("parameters"),
                 f"tools[{i}].function")

    raw_choice = body.get("tool_choice")
    choice, function, allowed = ("auto" if requested else "none"), None, None
    if isinstance(raw_choice, str):
        choice = raw_choice
    elif isinstance(raw_choice, dict) and raw_choice.get("type") == "function":
        choice, function = "function", raw_choice["function"]["name"]
    elif isinstance(raw_choice, dict):
        spec = raw_choice["allowed_tools"]
        choice = spec["mode"]
        allowed = tuple(t["function"]["name"] for t in spec["tools"])
    check_tool_choice(requested, choice, function, allowed, "tool_choice.function.name",
                      "tool_choice.allowed_tools.tools")

    response_format = body.get("response_format") or {"type": "text"}
    spec = response_format.get("json_schema")
    if response_format["type"] == "json_schema":
        if not isinstance(spec, dict):
            raise invalid("Missing required parameter: 'response_format.json_schema'.",
                          param="response_format.json_schema", code="invalid_value")
        if "schema" not in spec:
            raise invalid("'response_format' of type json_schema needs 'json_schema.schema'.",
                          param="response_format.json_schema.schema", code="invalid_value")
    schema = answer_schema(response_format["type"], (spec or {}).get("schema"), "response_format.json_schema.schema")
    parallel = body.get("parallel_tool_calls")
    return ToolRequest(tuple(requested), choice, function, allowed, parallel, schema)


@dataclasses.dataclass(frozen=True)
class EmbeddingRequest:
    """A valid ``POST /v1/embeddings`` body."""

    model: str
    inputs: list                     # texts, or lists of token ids
    base64: bool = False
    dimensions: int | None = None
    truncate: bool = False


def parse_embedding_request(body: dict) -> EmbeddingRequest:
    """Validate an embeddings body: ``input`` as a string, strings, token ids or lists of them."""
    check_body(_VALIDATORS["embedding"], body)
    raw = body["input"]
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    for i, item in enumerate(raw):
        if isinstance(item, str):
            if not item:
                param = "input" if isinstance(body["input"], str) else f"input[{i}]"
                raise invalid(f"Invalid value for '{param}': an input must not be an empty string.", param=param,
                              code="invalid_value")
            check_text(item, "input")
    return EmbeddingRequest(body["model"], list(raw), body.get("encoding_format") == "base64",
                            body.get("dimensions"), bool(body.get("truncate")))


@dataclasses.dataclass(frozen=True)
class RerankRequest:
    """A valid ``POST /v1/rerank`` body (llama-server's, Jina's and Cohere's shape)."""

    model: str
    query: str
    documents: list[str]
    top_n: int | None = None
    return_documents: bool = False
    truncate: bool = False


def parse_rerank_request(body: dict) -> RerankRequest:
    check_body(_VALIDATORS["rerank"], body)
    documents = [d if isinstance(d, str) else d["text"] for d in body["documents"]]
    for text in [body["query"], *documents]:
        check_text(text, "documents")
    return RerankRequest(body["model"], body["query"], documents, body.get("top_n"),
                         bool(body.get("return_documents")), bool(body.get("truncate")))


def unsupported_schema(exc: UnsupportedOutputSchema, body: dict) -> APIError:
    """A schema the backend cannot enforce, worded for the chat body's fields."""
    if exc.tool is not None:
        index = next((i for i, t in enumerate(body.get("tools") or ())
                      if isinstance(t, dict) and (t.get("function") or {}).get("name") == exc.tool), 0)
        return invalid(f"The parameters of function {exc.tool!r} cannot be enforced: {exc.detail}.",
                       param=f"tools[{index}].function.parameters", code="unsupported_schema")
    name = ((body.get("response_format") or {}).get("json_schema") or {}).get("name")
    return invalid(f"Invalid schema for response_format {name!r}: {exc.detail}.",
                   param="response_format.json_schema.schema", code="unsupported_schema")
