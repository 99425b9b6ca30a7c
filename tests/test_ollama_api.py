"""The Ollama dialect in-process: Falcon's TestClient over ``create_app`` with the fake backend of
``test_openai_api.py`` (bodies, NDJSON framing, option mapping, error shapes).  The real model and
the real ``ollama`` Python library are in ``test_e2e_ollama.py``."""

from __future__ import annotations

import json

import falcon.testing
import pytest

from tests.test_openai_api import BOOM_GENERATE, make_api, MODEL, WORDS  # noqa: F401 - make_api is a fixture

HI = [{"role": "user", "content": "Say hello."}]
ANSWER = "".join(w if i == 0 else " " + w for i, w in enumerate(WORDS))


@pytest.fixture
def ollama(make_api):
    harness = make_api(dialects=("openai", "ollama_api"))
    harness.client.plugin = harness.plugin
    return harness.client


def post(client, path: str, **body) -> falcon.testing.Result:
    return client.simulate_post(path, json=body)


def ndjson_lines(result: falcon.testing.Result) -> list[dict]:
    assert result.status_code == 200, result.text
    assert result.headers["content-type"] == "application/x-ndjson"
    assert result.text.endswith("\n")
    return [json.loads(line) for line in result.text.splitlines()]


def assert_error(result: falcon.testing.Result, status: int, *words: str) -> str:
    assert result.status_code == status, (result.status_code, result.text)
    assert set(result.json) == {"error"}, result.json
    for word in words:
        assert word in result.json["error"], result.json["error"]
    return result.json["error"]


def test_version_tags_show_ps(ollama):
    assert ollama.simulate_get("/api/version").json["version"]
    tags = ollama.simulate_get("/api/tags").json["models"]
    assert [m["name"] for m in tags] == [MODEL]
    assert set(tags[0]["details"]) >= {"format", "family", "parameter_size", "quantization_level"}
    shown = post(ollama, "/api/show", model=MODEL).json
    assert shown["capabilities"] == ["completion", "tools"]
    assert shown["details"]["format"] == "fake"
    assert post(ollama, "/api/show", model=f"{MODEL}:latest").status_code == 200  # the implied tag
    assert ollama.simulate_get("/api/ps").json == {"models": []}
    post(ollama, "/api/chat", model=MODEL, messages=HI, stream=False)
    assert [m["name"] for m in ollama.simulate_get("/api/ps").json["models"]] == [MODEL]


def test_chat_whole_and_streamed(ollama):
    body = post(ollama, "/api/chat", model=MODEL, messages=HI, stream=False).json
    assert body["message"] == {"role": "assistant", "content": ANSWER}
    assert body["done"] is True and body["done_reason"] == "stop"
    assert body["eval_count"] == len(WORDS) and body["prompt_eval_count"] > 0
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(body[key], int) and body[key] >= 0
    lines = ndjson_lines(post(ollama, "/api/chat", model=MODEL, messages=HI))  # streams by default
    assert "".join(line["message"]["content"] for line in lines) == ANSWER
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] == len(WORDS)


def test_options_map_to_sampling(ollama):
    body = post(ollama, "/api/chat", model=MODEL, messages=HI, stream=False,
                options={"num_predict": 2, "temperature": 0, "top_k": 5, "top_p": 0.5, "min_p": 0.1, "seed": 3,
                         "stop": ["zzz"], "num_ctx": 4096, "repeat_penalty": 1.0}).json
    assert body["done_reason"] == "length" and body["eval_count"] == 2
    params = ollama.plugin.backend.model.generated[-1][1]
    assert (params.temperature, params.top_k, params.top_p, params.min_p, params.seed) == (0, 5, 0.5, 0.1, 3)
    assert params.max_tokens == 2 and "zzz" in params.stop
    default = post(ollama, "/api/generate", model=MODEL, prompt="hi", stream=False).json
    assert default["response"] == ANSWER
    params = ollama.plugin.backend.model.generated[-1][1]
    assert (params.temperature, params.top_k, params.top_p) == (0.8, 40, 0.9)  # Ollama's defaults


def test_format_tools_and_think(ollama):
    post(ollama, "/api/chat", model=MODEL, messages=HI, stream=False, format="json")
    assert ollama.plugin.backend.model.generated[-1][1].output.answer == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    post(ollama, "/api/chat", model=MODEL, messages=HI, stream=False, format=schema)
    assert ollama.plugin.backend.model.generated[-1][1].output.answer == schema
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    history = HI + [{"role": "assistant", "content": "",
                     "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                    {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    assert post(ollama, "/api/chat", model=MODEL, messages=history, stream=False).status_code == 200
    sent = ollama.plugin.backend.model.prepared[-1].messages
    assert "Paris" in json.dumps(sent) and "sunny" in json.dumps(sent)  # calls and results reach the prompt
    # the tools' prompt does not fit the fake model's 64 tokens: that it gets that far shows they were taken
    assert_error(post(ollama, "/api/chat", model=MODEL, messages=HI, tools=tools), 400, "context")
    assert_error(post(ollama, "/api/chat", model=MODEL, messages=HI, tools=tools + tools), 400, "duplicate")
    for think in (True, False, "high"):
        assert post(ollama, "/api/chat", model=MODEL, messages=HI, stream=False, think=think).status_code == 200


def test_generate_raw_and_load(ollama):
    body = post(ollama, "/api/generate", model=MODEL, prompt="user: hi", raw=True, stream=False).json
    assert body["response"] == ANSWER and body["done"]
    assert ollama.plugin.backend.model.prepared[-1].prompt == "user: hi"
    post(ollama, "/api/generate", model=MODEL, prompt="hi", system="Be brief.", stream=False)
    assert ollama.plugin.backend.model.prepared[-1].messages[0] == {"role": "system", "content": "Be brief."}
    loaded = post(ollama, "/api/generate", model=MODEL).json
    assert loaded["done_reason"] == "load" and loaded["response"] == ""


def test_errors(ollama):
    assert_error(post(ollama, "/api/chat", model="nope", messages=HI), 404, "nope", "not found")
    assert_error(post(ollama, "/api/show", model="nope"), 404)
    assert_error(ollama.simulate_post("/api/chat", body=b"{oops"), 400, "JSON")
    assert_error(post(ollama, "/api/chat", messages=HI), 400, "model")
    assert_error(post(ollama, "/api/chat", model=MODEL, messages=[{"role": "user", "content": "x", "images": ["aGk="]}]),
                 400, "images")
    assert_error(post(ollama, "/api/chat", model=MODEL, messages=HI, options={"repeat_penalty": 1.3}), 400,
                 "repeat_penalty", "frequency_penalty")
    assert_error(post(ollama, "/api/chat", model=MODEL, messages=HI, options={"bogus": 1}), 400, "bogus")
    assert_error(post(ollama, "/api/chat", model=MODEL, messages=HI, format={"type": 5}), 400, "Schema")
    assert_error(post(ollama, "/api/generate", model=MODEL, prompt="x", template="{{ .Prompt }}"), 400, "template")
    assert_error(post(ollama, "/api/generate", model=MODEL, keep_alive="soon"), 400, "keep_alive")
    assert_error(post(ollama, "/api/embed", model=MODEL, input="x"), 400, "chat model")
    assert_error(post(ollama, "/api/pull", model="llama3"), 501, "ollama pull")
    assert_error(ollama.simulate_delete("/api/delete", json={"model": MODEL}), 501, "shimmy remove")
    for path in ("/api/push", "/api/create", "/api/copy"):
        assert_error(post(ollama, path, model=MODEL), 501)
    assert_error(ollama.simulate_get("/api/nothing-here"), 404)


def test_error_after_headers_is_a_last_line(ollama):
    lines = ndjson_lines(post(ollama, "/api/chat", model=MODEL,
                              messages=[{"role": "user", "content": BOOM_GENERATE}]))
    assert set(lines[-1]) == {"error"} and "secret" not in lines[-1]["error"]


def test_thinking_comes_back_as_thinking(make_api):
    from tests.test_responses_api import ThinkingModel

    harness = make_api(ThinkingModel(), dialects=("openai", "ollama_api"))
    client = harness.client
    client.plugin = harness.plugin
    body = post(client, "/api/chat", model=MODEL, messages=HI, stream=False, think=True).json
    assert body["message"]["thinking"] == "Let me think." and body["message"]["content"] == ANSWER
    assert client.plugin.backend.model.prepared[-1].reasoning.effort == "medium"
    lines = ndjson_lines(post(client, "/api/generate", model=MODEL, prompt="hi", think="low"))
    assert "".join(line.get("thinking", "") for line in lines) == "Let me think."
    assert client.plugin.backend.model.prepared[-1].reasoning.effort == "low"
    post(client, "/api/chat", model=MODEL, messages=HI, stream=False, think=False)
    assert client.plugin.backend.model.prepared[-1].reasoning.effort == "none"
