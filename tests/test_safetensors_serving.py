"""The SafeTensors backend in real servers: torch, transformers and llguidance stay
out of processes that do not need them, a missing extra is a clear 503, Hugging
Face cache snapshots load, a vanished client frees its row, a full queue is a
503 with Retry-After, and structured output and forced tool calls are enforced
(llguidance) through the openai SDK."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import MODEL_ID, ROOT, SAFETENSORS_MODEL_ID, open_stream, safetensors_missing, wait_for

HEAVY = ("torch", "transformers", "safetensors", "accelerate", "llguidance")
# Print, as the process exits, which heavy modules it imported.
REPORT_HEAVY = (
    "import atexit, sys\n"
    f"atexit.register(lambda: print('heavy modules:', sorted(m for m in {HEAVY!r} if m in sys.modules), flush=True))"
)
# As if the safetensors extra were not installed: imports fail, find_spec says None.
BLOCK_EXTRA = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in HEAVY)


def heavy_modules(lines: list[str]) -> list[str]:
    [line] = [line for line in "".join(lines).splitlines() if line.startswith("heavy modules:")]
    return json.loads(line.split(":", 1)[1].strip().replace("'", '"'))


def test_import_and_help_never_import_torch():
    code = (
        "import sys, shimmy_core, shimmy_core.cli, shimmy_core.app\n"
        "import shimmy_plugins.backends.safetensors.safetensors_backend\n"
        "try:\n    shimmy_core.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    shimmy_core.cli.main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        f"print('heavy modules:', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "usage: shimmy" in out.stdout
    assert heavy_modules([out.stdout]) == []


def test_gguf_only_server_never_imports_torch(start_server, smollm2_path):
    server = start_server(["--model", str(smollm2_path), "--no-demo"], prelude=REPORT_HEAVY)
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=60)
    assert client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3).choices
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert server.stop() == 0
    assert heavy_modules(server.lines) == []


def test_listing_a_safetensors_folder_does_not_import_torch(start_server, smollm2_path, safetensors_model_path):
    server = start_server(["--model", str(smollm2_path), "--model", str(safetensors_model_path), "--no-demo"],
                          prelude=REPORT_HEAVY)
    models = httpx.get(server.url + "/models", timeout=30).json()["data"]
    assert {m["id"]: m["format"] for m in models} == {MODEL_ID: "gguf", SAFETENSORS_MODEL_ID: "safetensors"}
    assert server.stop() == 0
    assert heavy_modules(server.lines) == []


def test_missing_extra_is_a_clear_503_and_gguf_still_works(start_server, smollm2_path, safetensors_model_path):
    server = start_server(["--model", str(smollm2_path), "--model", str(safetensors_model_path), "--no-demo"],
                          prelude=BLOCK_EXTRA)
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=SAFETENSORS_MODEL_ID, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 503
    assert info.value.body["code"] == "backend_unavailable"
    assert "pip install 'shimmy-server[safetensors]'" in info.value.body["message"]
    assert client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices


@pytest.mark.skipif(safetensors_missing() is not None, reason=str(safetensors_missing()))
def test_hugging_face_cache_snapshot_loads_with_progress(start_server, safetensors_model_path, tmp_path):
    """A hub cache laid out as huggingface_hub does: snapshot files are links into blobs/."""
    repo = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for number, source in enumerate(sorted(safetensors_model_path.iterdir())):
        blob = repo / "blobs" / f"{number:040x}"
        blob.symlink_to(source)
        (snapshot / source.name).symlink_to(os.path.relpath(blob, snapshot))
    server = start_server(["--no-demo"], HF_HUB_CACHE=str(tmp_path / "hub"), SHIMMY_PROGRESS_AFTER="0")
    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    listed = {m["id"]: m for m in httpx.get(server.url + "/models", timeout=30).json()["data"]}
    assert listed[name]["format"] == "safetensors" and listed[name]["owned_by"] == "HuggingFaceTB"
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=120)
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Say hello."}],
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    server.stop()
    output = "".join(server.lines)
    assert f"shimmy: {name} goes on cpu as float32 (" in output
    assert re.search(rf"^shimmy: loading {re.escape(name)} \([\d.]+ MB\) \.\.\. done in [\d.]+ s$", output, re.M), output


# ------------------------------------------------------------------ disconnects and the queue
def model_stats(server) -> dict:
    [stats] = httpx.get(server.base + "/health", timeout=10).json()["models"]
    return stats


@pytest.mark.skipif(safetensors_missing() is not None, reason=str(safetensors_missing()))
def test_disconnected_client_stops_its_generation(safetensors_server):
    sock = open_stream(safetensors_server, SAFETENSORS_MODEL_ID)
    assert model_stats(safetensors_server)["busy_slots"] == 1
    sock.close()
    assert wait_for(lambda: model_stats(safetensors_server)["busy_slots"] == 0)


@pytest.mark.skipif(safetensors_missing() is not None, reason=str(safetensors_missing()))
def test_full_queue_and_queue_timeout_are_503(start_server, safetensors_model_path, validate):
    server = start_server(["--model", str(safetensors_model_path), "--no-demo"],
                          SHIMMY_PARALLEL="1", SHIMMY_QUEUE_SIZE="1", SHIMMY_QUEUE_TIMEOUT="5")
    hi = {"model": SAFETENSORS_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    running = open_stream(server, SAFETENSORS_MODEL_ID)
    try:
        waited: dict = {}
        waiter = threading.Thread(target=lambda: waited.setdefault(
            "r", httpx.post(server.url + "/chat/completions", json={**hi, "stream": True}, timeout=30)))
        waiter.start()
        assert wait_for(lambda: model_stats(server)["queued"] == 1)
        full = httpx.post(server.url + "/chat/completions", json=hi, timeout=30)
        assert full.status_code == 503 and full.json()["error"]["code"] == "server_overloaded"
        assert int(full.headers["retry-after"]) >= 1
        validate(full.json(), "ErrorResponse")
        waiter.join(timeout=30)
        timed_out = waited["r"]  # a stream too: refused before any byte of it was sent
        assert timed_out.status_code == 503 and timed_out.json()["error"]["code"] == "queue_timeout"
        assert "retry-after" in timed_out.headers
    finally:
        running.close()
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=60)
    assert wait_for(lambda: model_stats(server)["busy_slots"] == 0)
    assert client.chat.completions.create(**hi).choices  # the slot is free again



# ------------------------------------------------------------------ structured output (llguidance)
@pytest.fixture(scope="module")
def st_client(safetensors_server):
    if safetensors_missing() is not None:
        pytest.skip(str(safetensors_missing()))
    return openai.OpenAI(base_url=safetensors_server.url, api_key="x", max_retries=0, timeout=120)


CAT = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                        "age": {"type": "integer", "minimum": 0, "maximum": 30},
                                        "color": {"enum": ["black", "white", "ginger", "grey"]}},
       "required": ["name", "age", "color"], "additionalProperties": False}
CAT_FORMAT = {"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT, "strict": True}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _arguments(call) -> dict:
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_st_json_object_and_json_schema(st_client):
    r = st_client.chat.completions.create(
        model=SAFETENSORS_MODEL_ID, messages=[{"role": "user", "content": "Reply with a JSON object with the name and age of a cat."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=40)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    r = st_client.chat.completions.create(model=SAFETENSORS_MODEL_ID, messages=[{"role": "user", "content": "A cat."}],
                                          response_format=CAT_FORMAT, temperature=0, max_tokens=40)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), CAT)
    stream = st_client.chat.completions.create(
        model=SAFETENSORS_MODEL_ID, messages=[{"role": "user", "content": "A cat."}], response_format=CAT_FORMAT,
        temperature=0.9, seed=5, max_tokens=40, stream=True)
    chunks = [c for c in stream if c.choices]
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), CAT)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_st_named_and_required_tool_calls(st_client):
    named = st_client.chat.completions.create(
        model=SAFETENSORS_MODEL_ID, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=40,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    _arguments(call)
    stream = st_client.chat.completions.create(
        model=SAFETENSORS_MODEL_ID, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0,
        max_tokens=40, stream=True)
    chunks = [c for c in stream if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    [head] = [d for d in deltas if d.id]
    assert head.function.name in ("get_weather", "get_time") and len(deltas) > 2  # arguments in pieces
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_st_parallel_required_allows_several_calls(st_client):
    # The end of turn banned (SmolLM2's <|im_end|> is 2): the grammar's several calls, then its end.
    r = st_client.chat.completions.create(
        model=SAFETENSORS_MODEL_ID, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
        parallel_tool_calls=True, temperature=0, max_tokens=120, logit_bias={"2": -100})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) > 1
    for call in choice.message.tool_calls:
        _arguments(call)
    one = st_client.chat.completions.create(
        model=SAFETENSORS_MODEL_ID, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
        temperature=0, max_tokens=60, logit_bias={"2": -100})
    assert one.choices[0].finish_reason == "tool_calls" and len(one.choices[0].message.tool_calls) == 1


def test_st_unsupported_schema_is_400(st_client):
    with pytest.raises(openai.BadRequestError) as info:
        st_client.chat.completions.create(
            model=SAFETENSORS_MODEL_ID, messages=ASK, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}})
    assert info.value.body["code"] == "unsupported_schema" and "uniqueItems" in info.value.body["message"]
    assert info.value.body["param"] == "response_format.json_schema.schema"
    bad = {"type": "function", "function": {"name": "tag", "parameters": {
        "type": "object", "properties": {"when": {"type": "string", "format": "uri-reference"}}}}}
    with pytest.raises(openai.BadRequestError) as info:
        st_client.chat.completions.create(model=SAFETENSORS_MODEL_ID, messages=ASK, max_tokens=5,
                                          tools=[WEATHER, bad], tool_choice="required")
    assert info.value.body["code"] == "unsupported_schema" and info.value.body["param"] == "tools[1].function.parameters"
