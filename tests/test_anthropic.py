"""The Anthropic Messages dialect: the translation on its own, then the official anthropic SDK (sync
and async) against a real server on SmolLM2 reached through model aliases, and the thinking model."""

from __future__ import annotations

import json
import threading
import time

import anthropic
import httpx
import pytest

from shimmy_core.catalog import ModelCatalog
from shimmy_core.choice_text import ChoiceText
from shimmy_core.contract.generation import (
    ContextLengthExceeded, Finish, InvalidRequest, ModelNotFound, Overloaded, ReasoningDelta, TextDelta, ToolCallDelta,
    Usage,
)
from shimmy_core.contract.model_info import DiscoveryResult, ModelInfo
from shimmy_core.contract.settings import Settings, SettingsError
from shimmy_core.response_cache import Recorder, replay, valid_entry
from shimmy_core.streams import with_heartbeat
from shimmy_plugins.dialects.anthropic.anthropic_errors import error_response
from shimmy_plugins.dialects.anthropic.anthropic_messages import MessageBuilder
from shimmy_plugins.dialects.anthropic.anthropic_requests import parse_request
from tests.conftest import MODEL_ID, THINKING_MODEL, serve_model

ALIAS = "claude-test-4-5"
KEY = "sk-ant-local"
GREEDY = {"temperature": 0}  # the SDK (2.x) no longer takes temperature as an argument
WEATHER = {"name": "get_weather", "description": "Get the weather of a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


# ------------------------------------------------------------------ translation, no server
def parsed(**body):
    return parse_request({"model": "m", "max_tokens": 10, **body}, 4096)


def test_blocks_become_the_neutral_messages():
    request = parsed(system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
                     messages=[
                         {"role": "user", "content": "Weather in Paris?"},
                         {"role": "system", "content": [{"type": "text", "text": "Environment: test"}]},
                         {"role": "assistant", "content": [
                             {"type": "thinking", "thinking": "I should call the tool.", "signature": ""},
                             {"type": "text", "text": "Let me look."},
                             {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                         {"role": "user", "content": [
                             {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "down"}],
                              "is_error": True},
                             {"type": "text", "text": "And now?"}]},
                     ], tools=[WEATHER], tool_choice={"type": "any", "disable_parallel_tool_use": True})
    messages = request.prompts[0].messages
    assert messages[0] == {"role": "system", "content": "Be brief.\n\nEnvironment: test"}
    assert messages[2] == {"role": "assistant", "content": "Let me look.", "reasoning_content": "I should call the tool.",
                           "tool_calls": [{"id": "toolu_1", "type": "function",
                                           "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert messages[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: down"}
    assert messages[4] == {"role": "user", "content": "And now?"}
    assert (request.tools.choice, request.tools.parallel) == ("required", False)
    assert request.tools.tools[0].parameters == WEATHER["input_schema"]


def test_sampling_thinking_and_the_ceiling():
    request = parse_request({"model": "m", "max_tokens": 32000, "messages": [{"role": "user", "content": "hi"}],
                             "temperature": 0, "top_k": 5, "stop_sequences": ["END"],
                             "thinking": {"type": "enabled", "budget_tokens": 2048}}, 64)
    prompt = request.prompts[0]
    assert (prompt.params.max_tokens, prompt.params.temperature, prompt.params.top_k) == (64, 0.0, 5)
    assert prompt.params.stop == ("END",)
    assert (prompt.reasoning.effort, prompt.reasoning.budget_tokens) == ("low", 2048)
    assert parsed(messages=[{"role": "user", "content": "hi"}], thinking={"type": "disabled"}).prompts[0].reasoning.effort == "none"
    adaptive = parsed(messages=[{"role": "user", "content": "hi"}], thinking={"type": "adaptive"},
                      output_config={"effort": "medium"})
    assert adaptive.prompts[0].reasoning.effort == "medium"


@pytest.mark.parametrize("body, words", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image blocks are not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "document blocks"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}]}, "prefill"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "server tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "tool", "name": "nope"}, "tools": [WEATHER]},
     "not one of the tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "thinking": {"type": "enabled", "budget_tokens": 10}},
     "greater than thinking.budget_tokens"),
])
def test_what_is_refused(body, words):
    with pytest.raises(InvalidRequest, match=words):
        parsed(**body)


def test_missing_max_tokens_is_refused_but_count_tokens_needs_none():
    with pytest.raises(InvalidRequest, match="max_tokens"):
        parse_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, 64)
    parse_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, 64, counting=True)


def feed(builder, chunks):
    return [event for chunk in chunks for event in builder.feed(chunk)]


def test_the_builder_streams_what_the_message_holds():
    builder = MessageBuilder("m", ("END",))
    events = feed(builder, [ReasoningDelta("hmm"), TextDelta("Hi"), TextDelta("!"),
                            ToolCallDelta(0, "call_abc", "get_weather", ""), ToolCallDelta(0, arguments='{"city":'),
                            ToolCallDelta(0, arguments='"Oslo"}'), Finish("tool_calls"), Usage(30, 9, 20)])
    events += builder.end_events()
    assert [e["type"] for e in events] == [
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    assert events[7]["content_block"] == {"type": "tool_use", "id": "toolu_abc", "name": "get_weather", "input": {}}
    message = builder.message()
    assert message["content"][2]["input"] == {"city": "Oslo"}
    assert message["stop_reason"] == "tool_use"
    assert message["usage"] == {"input_tokens": 10, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 20,
                                "output_tokens": 9}


@pytest.mark.parametrize("finish, reason, sequence", [
    (Finish("stop"), "end_turn", None), (Finish("stop", "END"), "stop_sequence", "END"),
    (Finish("stop", "<|im_end|>"), "end_turn", None), (Finish("length"), "max_tokens", None),
])
def test_stop_reasons(finish, reason, sequence):
    builder = MessageBuilder("m", ("END",))
    builder.feed(finish)
    assert builder.stop() == (reason, sequence)


def test_the_stop_string_hit_is_kept_through_the_choice_text_and_the_cache():
    text = ChoiceText(["END", "<|im_end|>"], 3, lambda piece: piece, lambda: "")
    chunks = [c for piece in ["Hello ", "EN", "D more"] for c in text.add(piece)]
    assert [c for c in chunks if isinstance(c, Finish)] == [Finish("stop", "END")]
    recorder = Recorder("messages")
    for chunk in chunks:
        recorder.add(0, chunk)
    entry = recorder.entry()
    assert valid_entry(entry, "messages")
    assert [c for _, c in replay(entry) if isinstance(c, Finish)] == [Finish("stop", "END")]


def test_errors_in_anthropic_shape():
    status, headers, body = error_response(Overloaded("Busy.", retry_after=2.5))
    assert (status, headers["retry-after"], body) == (529, "3", {"type": "error", "error": {
        "type": "overloaded_error", "message": "Busy."}})
    assert error_response(ModelNotFound("claude-x"))[0:3:2] == (404, {"type": "error", "error": {
        "type": "not_found_error", "message": error_response(ModelNotFound("claude-x"))[2]["error"]["message"]}})
    message = error_response(ContextLengthExceeded("x", prompt_tokens=9000, requested=100, context_length=8192))[2]
    assert message["error"]["message"].startswith("input length and `max_tokens` exceed context limit: 9000 + 100 > 8192")
    message = error_response(ContextLengthExceeded("x", prompt_tokens=9000, context_length=8192))[2]
    assert message["error"]["message"] == "prompt is too long: 9000 tokens > 8192 maximum"
    assert error_response(RuntimeError("boom"))[0] == 500


# ------------------------------------------------------------------ model aliases and the heartbeat
class _Source:
    name = "fake"
    priority = 1

    def discover(self):
        return DiscoveryResult([ModelInfo(id="qwen3", path="/m/qwen3.gguf", format="gguf", source="fake"),
                                ModelInfo(id="claude-real", path="/m/claude.gguf", format="gguf", source="fake")])


def test_aliases_resolve_in_the_catalog_and_never_hide_a_model():
    aliases = Settings.load({"model_alias": ["claude-sonnet-4-5=qwen3", "*=qwen3", "claude-real=qwen3"]}, {}).aliases()
    catalog = ModelCatalog([_Source()], aliases=aliases)
    assert catalog.lookup("claude-sonnet-4-5").id == "qwen3"
    assert catalog.lookup("CLAUDE-SONNET-4-5").id == "qwen3"
    assert catalog.lookup("anything-else").id == "qwen3"
    assert catalog.lookup("claude-real").id == "claude-real"
    assert catalog.get("claude-sonnet-4-5") is None and [m.id for m in catalog.list()] == ["qwen3", "claude-real"]
    assert ModelCatalog([_Source()], aliases={"a": "qwen3"}).lookup("b") is None
    assert ModelCatalog([_Source()], aliases={"a": "gone"}).alias_notes() == [
        "--model-alias a=gone: no model 'gone' is found now"]
    assert Settings.load({}, {"SHIMMY_MODEL_ALIAS": "a=b, *=c"}).aliases() == {"a": "b", "*": "c"}
    for bad in (["nope"], ["=x"], ["a=b", "a=c"]):
        with pytest.raises(SettingsError):
            Settings.load({"model_alias": bad}, {}).aliases()


def test_the_heartbeat_beats_while_nothing_comes_and_closes_what_it_read():
    closed = threading.Event()

    def slow():
        try:
            time.sleep(0.25)
            yield "a"
            yield "b"
        finally:
            closed.set()

    assert [x for x in with_heartbeat(slow(), 0.1) if x is not None] == ["a", "b"]
    assert None in list(with_heartbeat(slow(), 0.05)) and closed.wait(5)

    def failing():
        yield "a"
        raise RuntimeError("late")

    with pytest.raises(RuntimeError, match="late"):
        list(with_heartbeat(failing(), 1))


# ------------------------------------------------------------------ the anthropic SDK against a real server
@pytest.fixture(scope="module")
def anthropic_server(start_server, smollm2_path):
    return serve_model(start_server, smollm2_path, "--model-alias", f"{ALIAS}={MODEL_ID}", "--api-key", KEY)


@pytest.fixture(scope="module")
def claude(anthropic_server):
    return anthropic.Anthropic(base_url=anthropic_server.base, api_key=KEY, max_retries=0, timeout=120)


def ask(client, content="Say hi", **extra):
    return client.messages.create(model=ALIAS, max_tokens=extra.pop("max_tokens", 12), extra_body=GREEDY,
                                  messages=[{"role": "user", "content": content}], **extra)


def test_create_answers_through_an_alias(claude):
    message = ask(claude)
    assert message.id.startswith("msg_") and message.role == "assistant" and message.model == MODEL_ID
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens > 10
    assert 0 < message.usage.output_tokens <= 12


def test_a_stop_sequence_is_named(claude):
    text = ask(claude, max_tokens=20).content[0].text
    word = text.split()[2]
    message = ask(claude, max_tokens=20, stop_sequences=["zzz", word])
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", word)
    assert word not in message.content[0].text


async def _async_create(server):
    client = anthropic.AsyncAnthropic(base_url=server.base, api_key=KEY, max_retries=0, timeout=120)
    async with client.messages.stream(model=ALIAS, max_tokens=8, extra_body=GREEDY,
                                      messages=[{"role": "user", "content": "Say hi"}]) as stream:
        streamed = await stream.get_final_message()
    whole = await client.messages.create(model=ALIAS, max_tokens=8, extra_body=GREEDY,
                                         messages=[{"role": "user", "content": "Say hi"}])
    return streamed, whole


def test_async_client_stream_and_create_agree(anthropic_server):
    import asyncio

    streamed, whole = asyncio.run(_async_create(anthropic_server))
    assert streamed.content[0].text == whole.content[0].text
    assert streamed.stop_reason == whole.stop_reason and streamed.usage.output_tokens == whole.usage.output_tokens


def test_the_stream_is_the_exact_event_sequence(claude, anthropic_server):
    with claude.messages.stream(model=ALIAS, max_tokens=8, extra_body=GREEDY,
                                messages=[{"role": "user", "content": "Say hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == text and final.stop_reason in ("end_turn", "max_tokens")
    body = {"model": ALIAS, "max_tokens": 8, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Say hi"}]}
    with httpx.stream("POST", anthropic_server.base + "/v1/messages", json=body, timeout=60,
                      headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    names = [line.split(": ", 1)[1] for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.split(": ", 1)[1]) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in datas] == names
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert set(names[3:-3]) == {"content_block_delta"} and names[-3:] == ["content_block_stop", "message_delta",
                                                                           "message_stop"]
    assert datas[-2]["usage"]["output_tokens"] <= 8


def test_tool_use_and_the_result_round_trip(claude):
    first = ask(claude, "What is the weather in Paris?", max_tokens=40, tools=[WEATHER],
                tool_choice={"type": "tool", "name": "get_weather"})
    assert first.stop_reason == "tool_use"
    call = next(block for block in first.content if block.type == "tool_use")
    assert call.id.startswith("toolu_") and call.name == "get_weather" and isinstance(call.input, dict)
    assert isinstance(call.input.get("city"), str)
    answer = claude.messages.create(model=ALIAS, max_tokens=12, extra_body=GREEDY, tools=[WEATHER], messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}]},
    ], tool_choice={"type": "none"})
    assert answer.content[0].type == "text" and answer.stop_reason in ("end_turn", "max_tokens")


def test_tool_use_streams_its_input_in_pieces(claude):
    with claude.messages.stream(model=ALIAS, max_tokens=40, extra_body=GREEDY, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"},
                                messages=[{"role": "user", "content": "Weather in Rome?"}]) as stream:
        deltas = [event for event in stream if event.type == "content_block_delta"]
        final = stream.get_final_message()
    assert deltas and all(event.delta.type == "input_json_delta" for event in deltas)
    call = final.content[-1]
    assert call.type == "tool_use" and final.stop_reason == "tool_use"
    assert json.loads("".join(event.delta.partial_json for event in deltas)) == call.input


def test_count_tokens_counts_what_the_model_reads(claude):
    messages = [{"role": "user", "content": "Count me, please."}]
    counted = claude.messages.count_tokens(model=ALIAS, messages=messages, system="Be brief.")
    sent = claude.messages.create(model=ALIAS, max_tokens=1, extra_body=GREEDY, messages=messages, system="Be brief.",
                                  extra_headers={"Cache-Control": "no-cache"})
    assert counted.input_tokens == sent.usage.input_tokens + sent.usage.cache_read_input_tokens
    with_tools = claude.messages.count_tokens(model=ALIAS, messages=messages, system="Be brief.", tools=[WEATHER])
    assert with_tools.input_tokens > counted.input_tokens


def test_error_classes(claude, anthropic_server):
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="claude-unknown", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["error"]["type"] == "not_found_error"
    wrong = anthropic.Anthropic(base_url=anthropic_server.base, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.create(model=ALIAS, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError, match="image blocks are not supported"):
        claude.messages.create(model=ALIAS, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=ALIAS, max_tokens=0, messages=[{"role": "user", "content": "hi"}])
    raw = httpx.post(anthropic_server.base + "/v1/messages", content=b"{", timeout=30,
                     headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["type"] == "error"
    assert raw.json()["error"]["type"] == "invalid_request_error"
    missing_key = httpx.post(anthropic_server.base + "/v1/messages", json={}, timeout=30)
    assert missing_key.status_code == 401 and "x-api-key" in missing_key.json()["error"]["message"]
    # the OpenAI routes keep their own envelope, and take the key as x-api-key too
    models = httpx.get(anthropic_server.url + "/models", headers={"x-api-key": KEY}, timeout=30)
    assert models.status_code == 200 and ALIAS not in [m["id"] for m in models.json()["data"]]


def test_a_browser_preflight_may_send_anthropic_headers(anthropic_server):
    response = httpx.options(anthropic_server.base + "/v1/messages", timeout=30, headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key, anthropic-version, anthropic-beta, content-type"})
    assert response.status_code == 204
    assert "anthropic-version" in response.headers["access-control-allow-headers"]


# ------------------------------------------------------------------ thinking
@pytest.fixture(scope="module")
def thinker(think_server):
    return anthropic.Anthropic(base_url=think_server.base, api_key="unused", max_retries=0, timeout=120)


def test_thinking_enabled_gives_a_thinking_block_then_the_answer(thinker):
    message = thinker.messages.create(model=THINKING_MODEL, max_tokens=30, extra_body=GREEDY,
                                      thinking={"type": "enabled", "budget_tokens": 4},
                                      messages=[{"role": "user", "content": "Give me a JSON object about a dog."}])
    kinds = [block.type for block in message.content]
    assert kinds[0] == "thinking" and "text" in kinds
    assert message.content[0].thinking and "</think>" not in message.content[0].thinking
    with thinker.messages.stream(model=THINKING_MODEL, max_tokens=30, extra_body=GREEDY,
                                 thinking={"type": "enabled", "budget_tokens": 4},
                                 messages=[{"role": "user", "content": "Give me a JSON object about a dog."}]) as stream:
        deltas = [event.delta.type for event in stream if event.type == "content_block_delta"]
    assert deltas[0] == "thinking_delta" and "text_delta" in deltas


def test_thinking_disabled_answers_at_once(thinker):
    message = thinker.messages.create(model=THINKING_MODEL, max_tokens=12, extra_body=GREEDY,
                                      thinking={"type": "disabled"},
                                      messages=[{"role": "user", "content": "What is 2+2?"}])
    assert [block.type for block in message.content] == ["text"]
