"""Record what the OpenAI routes answer to a fixed set of requests, ids and timestamps masked,
so that two versions of Shimmy can be compared byte for byte.

    python scripts/wire_snapshot.py --url http://127.0.0.1:PORT > after.json
    diff before.json after.json

Start the server with the demo model, ``--cache off``, ``--api-key k`` and ``--parallel 1`` (one
slot: the same batch shapes every time). Every request is greedy or seeded, so the text is
deterministic on one machine and build. The set covers chat and completions, streamed or not,
logprobs, n, stop strings, tools (required, named, auto), response_format (json_object,
json_schema, an unenforceable schema), the models list, and errors: validation, unknown model,
missing key, oversize body, unknown route, wrong method, invalid JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.request

KEY = "k"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
HI = [{"role": "user", "content": "Say hello in three words."}]


def requests(model: str) -> list[tuple[str, str, dict | bytes | None, dict]]:
    """(name, method and path, body, extra headers)."""
    chat = {"model": model, "messages": HI, "max_tokens": 12, "temperature": 0}
    comp = {"model": model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    cases: list = [
        ("models", "GET /v1/models", None, {}),
        ("chat", "POST /v1/chat/completions", chat, {}),
        ("chat_stream", "POST /v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}}, {}),
        ("chat_seeded_n2", "POST /v1/chat/completions", {**chat, "temperature": 0.8, "seed": 7, "n": 2}, {}),
        ("chat_logprobs", "POST /v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 2, "max_tokens": 4}, {}),
        ("chat_stop", "POST /v1/chat/completions", {**chat, "stop": ["o"]}, {}),
        ("completion", "POST /v1/completions", comp, {}),
        ("completion_stream", "POST /v1/completions", {**comp, "stream": True, "echo": True}, {}),
        ("completion_logprobs", "POST /v1/completions", {**comp, "logprobs": 2, "max_tokens": 3}, {}),
        ("tools_required", "POST /v1/chat/completions",
         {**chat, "max_tokens": 40, "tools": [WEATHER, TIME], "tool_choice": "required",
          "messages": [{"role": "user", "content": "Weather in Paris?"}]}, {}),
        ("tools_named_stream", "POST /v1/chat/completions",
         {**chat, "max_tokens": 40, "stream": True, "tools": [WEATHER, TIME],
          "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
          "messages": [{"role": "user", "content": "Weather in Paris?"}]}, {}),
        ("tools_auto", "POST /v1/chat/completions", {**chat, "tools": [WEATHER]}, {}),
        ("json_object", "POST /v1/chat/completions", {**chat, "max_tokens": 20, "response_format": {"type": "json_object"}}, {}),
        ("json_schema", "POST /v1/chat/completions",
         {**chat, "max_tokens": 30, "response_format": {"type": "json_schema", "json_schema": {
             "name": "greeting", "schema": {"type": "object", "properties": {"text": {"type": "string", "maxLength": 20}},
                                            "required": ["text"]}}}}, {}),
        ("schema_unenforceable", "POST /v1/chat/completions",
         {**chat, "response_format": {"type": "json_schema", "json_schema": {
             "name": "odd", "schema": {"type": "integer", "multipleOf": 3}}}}, {}),
        ("tool_unenforceable", "POST /v1/chat/completions",
         {**chat, "tool_choice": "required", "tools": [{"type": "function", "function": {
             "name": "f", "parameters": {"type": "object", "properties": {"u": {"type": "string", "format": "uri"}}}}}]}, {}),
        ("bad_temperature", "POST /v1/chat/completions", {**chat, "temperature": 5}, {}),
        ("missing_messages", "POST /v1/chat/completions", {"model": model}, {}),
        ("unknown_model", "POST /v1/chat/completions", {**chat, "model": "nope"}, {}),
        ("invalid_json", "POST /v1/chat/completions", b"{not json", {}),
        ("too_large", "POST /v1/chat/completions", b"x" * (5 * 1024 * 1024), {}),
        ("no_key", "GET /v1/models", None, {"Authorization": ""}),
        ("wrong_key", "GET /v1/models", None, {"Authorization": "Bearer nope"}),
        ("unknown_route", "GET /v1/nothing", None, {}),
        ("wrong_method", "GET /v1/chat/completions", None, {}),
        ("unknown_model_get", "GET /v1/models/nope", None, {}),
        ("health", "GET /health", None, {"Authorization": ""}),
    ]
    return cases


_MASKS = [
    (re.compile(r"(chatcmpl|cmpl)-[A-Za-z0-9]+"), r"\1-ID"),
    (re.compile(r"call_[A-Za-z0-9]{24}"), "call_ID"),
    (re.compile(r'"created":\s*\d+'), '"created":0'),
    (re.compile(r'"version":\s*"[^"]*"'), '"version":"V"'),
]


def mask(text: str) -> str:
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text


def call(url: str, method_path: str, body, headers: dict) -> dict:
    method, path = method_path.split(" ", 1)
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {KEY}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for name, value in headers.items():
        if value:
            request.add_header(name, value)
        else:
            request.remove_header(name)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            status, raw, got = response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        status, raw, got = error.code, error.read(), error.headers
    keep = {k: got[k] for k in ("Content-Type", "Retry-After", "WWW-Authenticate", "X-Shimmy-Cache") if got.get(k)}
    return {"status": status, "headers": keep, "body": mask(raw.decode("utf-8", "replace"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    args = parser.parse_args()
    out = {name: call(args.url.rstrip("/"), mp, body, headers) for name, mp, body, headers in requests(args.model)}
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
