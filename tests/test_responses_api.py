"""The Responses API in-process: Falcon's TestClient over ``create_app`` with the fake backend of
``test_openai_api.py``; every body and every stream event checked against OpenAI's schemas.
The real model and real clients (openai SDK, openai-agents, Codex CLI) are in
``test_e2e_responses.py``."""

from __future__ import annotations

import json

import falcon.testing
import pytest

from shimmy_core.app import build, create_app
from shimmy_core.contract.generation import Finish, ReasoningDelta, TextDelta, ToolCallDelta, ToolExecuted, Usage
from shimmy_core.contract.settings import Settings
from shimmy_core.plugin_manager import create_plugin_manager
from shimmy_plugins.dialects.openai.responses_bodies import ResponseRun
from shimmy_plugins.dialects.openai.responses_requests import chat_messages, input_items, parse_responses_request
from shimmy_plugins.dialects.openai.responses_store import ResponseStore
from tests.conftest import builtin
from tests.test_openai_api import (  # noqa: F401 - api and make_api are fixtures
    api,
    assert_error,
    BOOM_GENERATE,
    FakeModel,
    FakePlugin,
    Harness,
    make_api,
    MODEL,
)

EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent", "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent", "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.reasoning_text.delta": "ResponseReasoningTextDeltaEvent",
    "response.reasoning_text.done": "ResponseReasoningTextDoneEvent",
    "response.completed": "ResponseCompletedEvent", "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent", "error": "ResponseErrorEvent",
}


class ThinkingModel(FakeModel):
    """Thinks (ReasoningDelta, as the core's reasoning parser will make them) before it answers."""

    def generate(self, prepared, params, cancelled):
        yield ReasoningDelta("Let me")
        yield ReasoningDelta(" think.")
        for chunk in super().generate(prepared, params, cancelled):
            if isinstance(chunk, Usage):
                chunk = Usage(chunk.prompt_tokens, chunk.completion_tokens + 2, reasoning_tokens=2)
            yield chunk


def create(api: Harness, **body) -> falcon.testing.Result:
    body.setdefault("model", MODEL)
    body.setdefault("input", "Say hello.")
    return api.post("/v1/responses", body)


def response_events(result: falcon.testing.Result, validate) -> list[dict]:
    """Parse a Responses stream: ``event:`` and ``data:`` lines, each event valid, numbered from 0."""
    assert result.status_code == 200, result.text
    assert result.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in result.text.split("\n\n")[:-1]:
        head, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}"
        validate(event, "ResponseStreamEvent")
        validate(event, EVENT_SCHEMAS[event["type"]])
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


# ------------------------------------------------------------------ whole responses
def test_create_answers_a_valid_response(api):
    r = create(api, instructions="Be brief.", metadata={"k": "v"}, temperature=0, user="u1")
    assert r.status_code == 200, r.text
    body = r.json
    api.validate(body, "Response")
    assert body["object"] == "response" and body["id"].startswith("resp_") and body["status"] == "completed"
    assert body["model"] == MODEL and body["metadata"] == {"k": "v"} and body["instructions"] == "Be brief."
    [message] = body["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    assert message["content"][0]["text"] == "alpha beta gamma delta epsilon zeta eta theta"
    usage = body["usage"]
    assert usage["output_tokens"] == 8 and usage["total_tokens"] == usage["input_tokens"] + 8
    assert usage["input_tokens_details"]["cached_tokens"] == 0
    assert usage["output_tokens_details"]["reasoning_tokens"] == 0
    sent = api.model.prepared[-1].messages
    assert sent[0] == {"role": "system", "content": "Be brief."} and sent[1] == {"role": "user", "content": "Say hello."}


def test_max_output_tokens_makes_an_incomplete_response(api):
    body = create(api, max_output_tokens=3).json
    api.validate(body, "Response")
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete" and body["max_output_tokens"] == 3


def test_reasoning_becomes_a_reasoning_item_and_reasoning_tokens(make_api):
    api = make_api(ThinkingModel())
    body = create(api, reasoning={"effort": "low"}).json
    api.validate(body, "Response")
    reasoning, message = body["output"]
    assert reasoning["type"] == "reasoning" and reasoning["summary"] == []
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert message["content"][0]["text"].startswith("alpha")
    assert body["usage"]["output_tokens_details"]["reasoning_tokens"] == 2
    assert body["reasoning"]["effort"] == "low"
    assert api.model.prepared[-1].reasoning.effort == "low"


def test_logprobs_come_with_include(api):
    body = create(api, include=["message.output_text.logprobs"], top_logprobs=2).json
    api.validate(body, "Response")
    logprobs = body["output"][0]["content"][0]["logprobs"]
    assert len(logprobs) == 8 and len(logprobs[0]["top_logprobs"]) == 2


# ------------------------------------------------------------------ streams
def test_stream_sends_the_whole_event_sequence(api):
    events = response_events(create(api, stream=True), api.validate)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == text == events[-4]["text"]
    assert events[0]["response"]["status"] == "in_progress" and "usage" not in events[0]["response"]
    assert final["id"] == events[0]["response"]["id"] and final["usage"]["output_tokens"] == 8


def test_stream_with_reasoning_and_an_incomplete_end(make_api):
    api = make_api(ThinkingModel())
    events = response_events(create(api, stream=True, max_output_tokens=2), api.validate)
    kinds = [e["type"] for e in events]
    assert "response.reasoning_text.delta" in kinds and "response.reasoning_text.done" in kinds
    assert kinds[-1] == "response.incomplete"
    assert [i["type"] for i in events[-1]["response"]["output"]] == ["reasoning", "message"]


def test_an_error_mid_stream_is_an_error_event_then_response_failed(api):
    events = response_events(create(api, stream=True, input=f"{BOOM_GENERATE} now"), api.validate)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert "secret" not in json.dumps(events)


def test_run_events_for_calls_and_server_tools_are_valid(validate, api):
    """The event sequence of every output item kind, chunk by chunk, against the schemas."""
    request = parse_responses_request({"model": MODEL, "input": "x", "tools": [
        {"type": "namespace", "name": "ns", "description": "d", "tools": [{"type": "function", "name": "f"}]}]}, [])
    run = ResponseRun(request, MODEL, store=False)
    events = run.start()
    for chunk in (TextDelta("Calling."), ToolCallDelta(0, "call_1", "f", ""), ToolCallDelta(0, arguments='{"a":'),
                  ToolCallDelta(0, arguments=" 1}"), ToolExecuted("call_2", "calculator", '{"expression":"1+1"}', "2"),
                  ToolExecuted("call_3", "calculator", "{}", "error: bad", is_error=True), Finish("tool_calls"),
                  Usage(5, 7)):
        events += run.feed(chunk)
    events += run.end()
    for i, event in enumerate(events):
        assert event["sequence_number"] == i
        validate(event, EVENT_SCHEMAS[event["type"]])
    output = events[-1]["response"]["output"]
    assert [i["type"] for i in output] == ["message", "function_call", "mcp_call", "mcp_call"]
    assert output[1]["arguments"] == '{"a": 1}' and output[1]["call_id"] == "call_1" and output[1]["namespace"] == "ns"
    assert output[2]["server_label"] == "shimmy" and output[2]["output"] == "2" and output[3]["status"] == "failed"
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done[0]["arguments"] == '{"a": 1}' and done[0]["name"] == "f"


# ------------------------------------------------------------------ input items and the prompt
def test_input_items_become_chat_messages():
    items = input_items([
        {"role": "developer", "content": "Rules."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "think"}]},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]},
    ])
    assert all(item["id"] for item in items)
    assert chat_messages("Sys.", items) == [
        {"role": "system", "content": "Sys."},
        {"role": "system", "content": "Rules."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny", "name": "weather"},
        {"role": "assistant", "content": "Sunny."},
    ]


@pytest.mark.parametrize("extra, param, code", [
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role", None),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type", None),
    ({"input": [{"type": "web_search_call", "id": "ws"}]}, "input[0].type", "unsupported_value"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id", None),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "unsupported_value"),
    ({"input": 5}, "input", "invalid_value"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_tool"),
    ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[0].type", "unsupported_tool"),
    ({"tools": [{"type": "custom", "name": "x"}]}, "tools[0].type", "unsupported_tool"),
    ({"tools": [{"type": "function", "name": "a b"}]}, "tools[0].name", "invalid_value"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "nope"}}]}, "tools[0].parameters",
     "invalid_schema"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
     "tool_choice.name", "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", None),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice.type", "unsupported_tool"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "invalid_value"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type", "invalid_value"),
    ({"temperature": 3}, "temperature", "invalid_value"),
    ({"max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"reasoning": {"effort": "huge"}}, "reasoning.effort", "invalid_value"),
    ({"include": ["everything"]}, "include[0]", "invalid_value"),
    ({"metadata": {"k": 1}}, "metadata.k", "invalid_value"),
    ({"background": True}, "background", "unsupported_value"),
    ({"conversation": "conv_1"}, "conversation", "unsupported_value"),
    ({"previous_response_id": "resp_nope"}, "previous_response_id", "previous_response_not_found"),
])
def test_bad_input_is_400_naming_the_path(api, extra, param, code):
    error = assert_error(create(api, **extra), api.validate, 400, param=param)
    if code is not None:
        assert error["code"] == code, error


def test_hosted_tools_are_refused_by_name(api):
    error = assert_error(create(api, tools=[{"type": "function", "name": "f"}, {"type": "file_search",
                                                                             "vector_store_ids": ["v"]}]),
                         api.validate, 400, param="tools[1].type", code="unsupported_tool")
    assert "file_search" in error["message"]


def test_truncation_auto_drops_the_oldest_turns(api):
    long = " ".join(["word"] * 30)
    turns = [{"role": "user", "content": long}, {"role": "assistant", "content": long},
             {"role": "user", "content": "Say hello."}]
    assert_error(create(api, input=turns), api.validate, 400, param="input", code="context_length_exceeded")
    body = create(api, input=turns, truncation="auto").json
    api.validate(body, "Response")
    assert body["truncation"] == "auto" and api.model.prepared[-1].messages == (
        {"role": "user", "content": "Say hello."},)


# ------------------------------------------------------------------ stored responses
def test_stored_responses_retrieve_list_continue_delete(api):
    first = create(api, input=[{"role": "user", "content": "One."}, {"role": "user", "content": "Two."}]).json
    got = api.client.simulate_get(f"/v1/responses/{first['id']}")
    assert got.status_code == 200 and got.json == first
    items = api.client.simulate_get(f"/v1/responses/{first['id']}/input_items").json
    api.validate(items, "ResponseItemList")
    assert [i["content"][0]["text"] for i in items["data"]] == ["Two.", "One."] and not items["has_more"]
    page = api.client.simulate_get(f"/v1/responses/{first['id']}/input_items",
                                   params={"order": "asc", "limit": "1"}).json
    assert [i["content"][0]["text"] for i in page["data"]] == ["One."] and page["has_more"]
    rest = api.client.simulate_get(f"/v1/responses/{first['id']}/input_items",
                                   params={"order": "asc", "after": page["last_id"]}).json
    assert [i["content"][0]["text"] for i in rest["data"]] == ["Two."]

    second = create(api, input="Three.", previous_response_id=first["id"], instructions="New rules.").json
    api.validate(second, "Response")
    assert second["previous_response_id"] == first["id"]
    assert [m["content"] for m in api.model.prepared[-1].messages] == [
        "New rules.", "One.", "Two.", first["output"][0]["content"][0]["text"], "Three."]
    items = api.client.simulate_get(f"/v1/responses/{second['id']}/input_items", params={"order": "asc"}).json
    api.validate(items, "ResponseItemList")
    assert [i["type"] for i in items["data"]] == ["message"] * 4 and items["data"][2]["role"] == "assistant"

    deleted = api.client.simulate_delete(f"/v1/responses/{first['id']}")
    assert deleted.status_code == 200 and deleted.json == {"id": first["id"], "object": "response", "deleted": True}
    for r in (api.client.simulate_get(f"/v1/responses/{first['id']}"),
              api.client.simulate_delete(f"/v1/responses/{first['id']}"),
              api.client.simulate_get(f"/v1/responses/{first['id']}/input_items")):
        assert_error(r, api.validate, 404, param="response_id", code="not_found")


def test_a_streamed_response_is_stored_when_it_ends(api):
    events = response_events(create(api, stream=True), api.validate)
    final = events[-1]["response"]
    assert api.client.simulate_get(f"/v1/responses/{final['id']}").json == final


def test_store_false_and_no_store_responses(make_api):
    api = make_api()
    body = create(api, store=False).json
    assert body["store"] is False
    assert_error(api.client.simulate_get(f"/v1/responses/{body['id']}"), api.validate, 404)
    off = make_api(store_responses=False)
    body = create(off).json
    assert body["store"] is False
    assert_error(create(off, previous_response_id=body["id"]), off.validate, 400, param="previous_response_id",
                 code="storage_disabled")


def test_the_store_is_bounded_by_count_bytes_and_time():
    now = [0.0]
    store = ResponseStore(True, max_count=2, max_bytes=10_000, ttl=60, clock=lambda: now[0])
    for n in range(3):
        assert store.put({"id": f"r{n}", "output": []}, [])
    assert store.get("r0") is None and store.get("r2") is not None and len(store) == 2
    now[0] = 61
    assert store.get("r2") is None and len(store) == 0 and store.bytes == 0
    small = ResponseStore(True, max_count=100, max_bytes=200, ttl=0, clock=lambda: now[0])
    assert not small.put({"id": "big", "output": ["x" * 300]}, [])
    assert small.put({"id": "a", "output": ["x" * 100]}, []) and small.put({"id": "b", "output": ["x" * 100]}, [])
    assert small.get("a") is None and small.get("b") is not None and small.bytes <= 200
    assert not ResponseStore(False, 10, 10_000, 60).put({"id": "x", "output": []}, [])


def test_input_tokens_counts_the_prompt(api):
    r = api.post("/v1/responses/input_tokens", {"model": MODEL, "input": "one two three", "instructions": "Sys."})
    assert r.status_code == 200, r.text
    api.validate(r.json, "TokenCountsResource")
    assert r.json == {"object": "response.input_tokens", "input_tokens": 6}  # "system: Sys.\nuser: one two three"
    assert api.model.generated == []
    assert_error(api.post("/v1/responses/input_tokens", {"model": MODEL, "tools": [{"type": "mcp"}]}),
                 api.validate, 400, param="tools[0].type", code="unsupported_tool")


def test_the_plugin_can_be_left_out(make_api, validate):
    settings = Settings.load({"demo": False}, {})
    pm = create_plugin_manager(load_entry_points=False, extra_plugins=[("fake", FakePlugin()), builtin("openai")])
    shimmy = build(settings, pm)
    try:
        client = falcon.testing.TestClient(create_app(shimmy), headers={"Host": "localhost"})
        r = client.simulate_post("/v1/responses", json={"model": MODEL, "input": "x"})
        assert r.status_code == 404
        validate(r.json, "ErrorResponse")
    finally:
        shimmy.close()
