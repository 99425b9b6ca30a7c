"""Ollama's ``/api/chat`` and ``/api/generate`` bodies, checked and translated into the neutral
:class:`ParsedRequest`: ``options`` into sampling, ``format`` into an :class:`OutputFormat`,
``tools`` and ``tool_calls`` (arguments as JSON objects) into the neutral tools, ``think`` into
:class:`ReasoningOptions`.  What Shimmy cannot honour is refused with a 400 that says so."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Mapping

from shimmy_core.plugin_api import BodySchema, check_schema, GenerationRequest, json_path, ModelInfo, OutputFormat, ParsedRequest
from shimmy_core.plugin_api import ReasoningOptions, RequestedTool, SamplingParams, SchemaProblem, ToolRequest
from shimmy_plugins.dialects.ollama.ollama_errors import bad_request

# Ollama's defaults where a request and the model's Modelfile say nothing.
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0}
# Options about how a model is loaded or run, not how it samples: accepted and ignored (Shimmy
# loads a model once, with the server's --ctx-size and backend settings, for every request).
IGNORED_OPTIONS = frozenset({
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "num_thread", "num_keep",
    "low_vram", "numa", "vocab_only", "f16_kv", "repeat_last_n", "penalize_newline",
})
# Sampling options Shimmy's backends do not have, accepted only at the value that turns them off.
NEUTRAL_ONLY = {"repeat_penalty": 1.0, "mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0}
THINK_LEVELS = ("low", "medium", "high")
MAX_STOPS = 16

_NUMBER = {"type": "number"}
_OPTIONS = {
    "type": ["object", "null"],
    "properties": {
        "num_predict": {"type": "integer"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0},
        "seed": {"type": "integer"},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "maxItems": MAX_STOPS, "items": {"type": "string"}}]},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "repeat_penalty": _NUMBER, "typical_p": _NUMBER, "tfs_z": _NUMBER, "mirostat": _NUMBER,
    },
}
_FUNCTION_CALL = {
    "type": "object",
    "required": ["function"],
    "properties": {"function": {"type": "object", "required": ["name"],
                                "properties": {"name": {"type": "string"}, "arguments": {"type": ["object", "string"]}}}},
}
_TOOL = {
    "type": "object",
    "required": ["function"],
    "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "pattern": "^[a-zA-Z0-9_.-]{1,64}$"},
                                    "description": {"type": "string"}, "parameters": {"type": "object"}}},
    },
}
_SHARED = {
    "model": {"type": "string", "minLength": 1},
    "stream": {"type": ["boolean", "null"]},
    "format": {"anyOf": [{"enum": [None, "", "json"]}, {"type": "object"}]},
    "options": _OPTIONS,
    "keep_alive": {"type": ["string", "number", "null"]},
    "think": {"anyOf": [{"type": ["boolean", "null"]}, {"enum": list(THINK_LEVELS)}]},
    "images": {"type": ["array", "null"]},
}
CHAT = BodySchema({
    "type": "object",
    "required": ["model"],
    "properties": {
        **_SHARED,
        "messages": {"type": ["array", "null"], "maxItems": 4096, "items": {
            "type": "object",
            "required": ["role"],
            "properties": {
                "role": {"enum": ["system", "user", "assistant", "tool"]},
                "content": {"type": ["string", "null"]},
                "thinking": {"type": ["string", "null"]},
                "images": {"type": ["array", "null"]},
                "tool_calls": {"type": ["array", "null"], "items": _FUNCTION_CALL},
                "tool_name": {"type": "string"},
            },
        }},
        "tools": {"type": ["array", "null"], "maxItems": 128, "items": _TOOL},
    },
})
GENERATE = BodySchema({
    "type": "object",
    "required": ["model"],
    "properties": {**_SHARED, "prompt": {"type": ["string", "null"]}, "suffix": {"type": ["string", "null"]},
                   "system": {"type": ["string", "null"]}, "template": {"type": ["string", "null"]},
                   "raw": {"type": ["boolean", "null"]}, "context": {"type": ["array", "null"]}},
})
EMBED = BodySchema({
    "type": "object",
    "required": ["model"],
    "properties": {"model": _SHARED["model"], "keep_alive": _SHARED["keep_alive"], "options": {"type": ["object", "null"]},
                   "input": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}]},
                   "prompt": {"type": "string"}, "truncate": {"type": ["boolean", "null"]},
                   "dimensions": {"type": ["integer", "null"], "minimum": 1}},
})
NAMED = BodySchema({"type": "object", "properties": {"model": _SHARED["model"], "name": _SHARED["model"]}})


def read_json(raw: bytes) -> dict:
    """A request body as a JSON object (NaN and Infinity refused), else a 400."""
    def refuse(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        body = json.loads(raw.decode("utf-8") if raw else "{}", parse_constant=refuse)
    except RecursionError:
        raise bad_request("the JSON body is nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise bad_request(f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("the JSON body must be an object")
    _refuse_bad_text(body, 0)
    return body


def _refuse_bad_text(value: Any, depth: int) -> None:
    if depth > 64:
        raise bad_request("the JSON body is nested deeper than 64 levels")
    if isinstance(value, str):
        if "\x00" in value or any("\ud800" <= ch <= "\udfff" for ch in value):
            raise bad_request("text must not contain NUL characters or lone surrogates")
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_bad_text(key, depth + 1)
            _refuse_bad_text(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _refuse_bad_text(item, depth + 1)


def check(validator: BodySchema, body: dict) -> None:
    """The body against a request schema: the first problem is a 400 naming its field."""
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(body))
    if error is None:
        return
    where = json_path(list(error.absolute_path)) or "body"
    detail = error.message if len(error.message) <= 200 else error.message[:200] + "..."
    raise bad_request(f"invalid value for {where}: {detail}")


def model_name(body: dict) -> str:
    name = body.get("model") or body.get("name")
    if not name:
        raise bad_request("model is required")
    return name


def find_model(catalog, name: str) -> ModelInfo | None:
    """A model by an Ollama name: as given, then with the ``:latest`` tag Ollama implies (``llama3``
    is ``llama3:latest``), then without it (a Shimmy id spelled with ``:latest``)."""
    info = catalog.get(name)
    if info is None and ":" not in name.rsplit("/", 1)[-1]:
        info = catalog.get(name + ":latest")
    if info is None and name.endswith(":latest"):
        info = catalog.get(name[: -len(":latest")])
    return info


def model_id(catalog, name: str) -> str:
    """The catalog id for ``name``, or the name itself (the service then answers 404)."""
    info = find_model(catalog, name)
    return info.id if info is not None else name


def refuse_images(body: dict, messages: list[dict]) -> None:
    if body.get("images") or any(m.get("images") for m in messages):
        raise bad_request("images are not supported: Shimmy serves text models only "
                          "(send the text, or use Ollama itself for vision models)")


def answer_schema(fmt) -> Any:
    """``format``: ``"json"`` is any JSON object, an object is the answer's JSON Schema."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return {"type": "object"}
    try:
        check_schema(fmt)
    except SchemaProblem as exc:
        raise bad_request(f"invalid JSON Schema in format: {exc}") from None
    return fmt


def sampling(options: dict | None, info: ModelInfo | None, schema,
             defaults: Mapping[str, float] = {}) -> SamplingParams:
    """``options`` over the model's Modelfile parameters over the server's ``defaults``
    (``--temp``, ``--top-p``, ...) over Ollama's defaults."""
    options = dict(options or {})
    for name in sorted(options):
        if name in IGNORED_OPTIONS or name in _OPTIONS["properties"]:
            continue
        raise bad_request(f"unknown option {name!r}; Shimmy takes num_predict, temperature, top_p, top_k, min_p, "
                          "seed, stop, presence_penalty and frequency_penalty (and ignores num_ctx and the other "
                          "load-time options)")
    for name, neutral in NEUTRAL_ONLY.items():
        if name in options and float(options[name]) != float(neutral):
            hint = " (presence_penalty and frequency_penalty are supported)" if name == "repeat_penalty" else ""
            raise bad_request(f"option {name} is not supported by Shimmy's backends; leave it out or set it to "
                              f"{neutral}{hint}")
    modelfile = dict((info.extra.get("options") or {}) if info is not None else {})
    chosen = {**OLLAMA_DEFAULTS, **defaults, **{k: v for k, v in modelfile.items() if k in OLLAMA_DEFAULTS}}
    chosen.update({k: v for k, v in options.items() if k in OLLAMA_DEFAULTS})
    stop = options.get("stop", ())
    stops = (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)
    predict = options.get("num_predict")
    return SamplingParams(
        max_tokens=int(predict) if predict is not None and predict > 0 else None,  # -1, -2: up to the context
        temperature=float(chosen["temperature"]),
        top_p=float(chosen["top_p"]),
        top_k=int(chosen["top_k"]),
        min_p=float(chosen["min_p"]),
        stop=stops,
        seed=int(options["seed"]) if options.get("seed") is not None else None,
        presence_penalty=float(options.get("presence_penalty", 0.0)),
        frequency_penalty=float(options.get("frequency_penalty", 0.0)),
        output=OutputFormat(answer=schema) if schema is not None else None,
    )


def reasoning(think) -> ReasoningOptions | None:
    """``think``: true turns thinking on, false off, a level sets the effort; absent: the model's default."""
    if think is None:
        return None
    if think is True:
        return ReasoningOptions(effort="medium")
    return ReasoningOptions(effort="none" if think is False else think)


def _arguments(call: dict, where: str) -> str:
    args = call["function"].get("arguments", {})
    if isinstance(args, str):  # some clients send the JSON text, as OpenAI does
        try:
            args = json.loads(args or "{}")
        except ValueError:
            raise bad_request(f"{where}.function.arguments is not a JSON object") from None
    if not isinstance(args, dict):
        raise bad_request(f"{where}.function.arguments must be an object")
    return json.dumps(args, ensure_ascii=False)


def neutral_messages(messages: list[dict]) -> list[dict]:
    """Ollama messages as the neutral (OpenAI-shaped) messages the core renders; a tool result
    answers the latest call to the function it names (``tool_name``)."""
    out: list[dict] = []
    call_ids: dict[str, str] = {}
    for i, message in enumerate(messages):
        item: dict = {"role": message["role"], "content": message.get("content") or ""}
        if message.get("thinking"):
            item["reasoning_content"] = message["thinking"]
        calls = []
        for j, call in enumerate(message.get("tool_calls") or ()):
            call_id = f"call_{uuid.uuid4().hex[:24]}"
            name = call["function"]["name"]
            call_ids[name] = call_id
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": name, "arguments": _arguments(call, f"messages[{i}].tool_calls[{j}]")}})
        if calls:
            item["tool_calls"] = calls
        if message["role"] == "tool" and message.get("tool_name"):
            item["name"] = message["tool_name"]
            if message["tool_name"] in call_ids:
                item["tool_call_id"] = call_ids[message["tool_name"]]
        out.append(item)
    return out


def tool_request(tools: list[dict] | None, schema) -> ToolRequest:
    requested: list[RequestedTool] = []
    for i, tool in enumerate(tools or ()):
        function = tool["function"]
        parameters = function.get("parameters")
        if parameters is not None:
            try:
                check_schema(parameters)
            except SchemaProblem as exc:
                raise bad_request(f"invalid JSON Schema in tools[{i}].function.parameters: {exc}") from None
        if any(t.name == function["name"] for t in requested):
            raise bad_request(f"duplicate function name {function['name']!r} in tools")
        requested.append(RequestedTool(function["name"], function.get("description"), parameters, len(requested)))
    return ToolRequest(tuple(requested), "auto" if requested else "none", None, None, None, schema)


def chat_request(body: dict, info: ModelInfo, max_messages: int, defaults: Mapping[str, float] = {}) -> ParsedRequest:
    """A checked ``/api/chat`` body with at least one message, for the model ``info``."""
    messages = body["messages"]
    if len(messages) > max_messages:
        raise bad_request(f"too many messages: {len(messages)}; this server accepts at most {max_messages} "
                          "(SHIMMY_MAX_MESSAGES)")
    refuse_images(body, messages)
    schema = answer_schema(body.get("format"))
    params = sampling(body.get("options"), info, schema, defaults)
    prompt = GenerationRequest(messages=tuple(neutral_messages(messages)), params=params,
                               reasoning=reasoning(body.get("think")))
    return ParsedRequest(kind="chat", model=info.id, prompts=(prompt,), n=1, stream=body.get("stream") is not False,
                         include_usage=True, echo=False, tools=tool_request(body.get("tools"), schema))


def generate_request(body: dict, info: ModelInfo, defaults: Mapping[str, float] = {}) -> ParsedRequest:
    """A checked ``/api/generate`` body with a prompt: through the model's chat template (with
    ``system``), or as it is with ``raw``.  ``template`` (a Go template) and ``suffix`` (fill in
    the middle) are refused; ``context`` (the tokens of an earlier answer) too."""
    refuse_images(body, [])
    if body.get("template"):
        raise bad_request("template is not supported: Shimmy renders prompts with the model's own chat template; "
                          "send raw: true with the prompt already formatted instead")
    if body.get("suffix"):
        raise bad_request("suffix (fill in the middle) is not supported by Shimmy")
    if body.get("context"):
        raise bad_request("context is not supported: Shimmy does not return or take token contexts; "
                          "use /api/chat with the conversation's messages")
    schema = answer_schema(body.get("format"))
    params = sampling(body.get("options"), info, schema, defaults)
    stream = body.get("stream") is not False
    if body.get("raw"):
        if body.get("system"):
            raise bad_request("system has no place in a raw prompt; write it into the prompt")
        prompt = GenerationRequest(prompt=body["prompt"], params=params)
        return ParsedRequest(kind="completion", model=info.id, prompts=(prompt,), n=1, stream=stream,
                             include_usage=True, echo=False)
    system = body.get("system")  # without one, the backend adds the model's default system prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": body["prompt"]}]
    prompt = GenerationRequest(messages=tuple(messages), params=params, reasoning=reasoning(body.get("think")))
    return ParsedRequest(kind="chat", model=info.id, prompts=(prompt,), n=1, stream=stream, include_usage=True,
                         echo=False, tools=tool_request(None, schema))


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: Any) -> float | None:
    """A request's ``keep_alive`` in seconds, as Ollama reads it: a number of seconds or a Go
    duration (``"5m"``, ``"1h30m"``, ``"0"``); negative: keep the model loaded.  None: not given."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    sign, rest = (-1.0, text[1:]) if text.startswith("-") else (1.0, text)
    parts = _DURATION_PART.findall(rest)
    if not parts or "".join(n + u for n, u in parts) != rest:
        raise bad_request(f"invalid keep_alive {value!r}: use seconds or a duration such as \"5m\"")
    return sign * sum(float(n) * _DURATION_SECONDS[u] for n, u in parts)
