"""Reasoning kept apart from the answer.

The parser is tested on its own (markers split across tokens, gpt-oss channels, models that do
not think), then end to end on a real thinking model: SmolLM2's GGUF written again with a chat
template that opens ``<think>`` (and closes it when ``enable_thinking`` is false).  The tiny model
rarely closes its thoughts by itself, so the tests force it through one with the reasoning budget,
which is the feature under test: the reasoning is cut after N tokens, the close marker is written
for the model and its answer follows.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from shimmy_core.contract.generation import ReasoningDelta, TextDelta
from shimmy_core.reasoning import CHANNELS, THINK, ReasoningParser, opens_thinking, reasoning_syntax
from tests.conftest import THINKING_MODEL as MODEL, THINKING_TEMPLATE, sdk_client, serve_model


def split(syntax, thinking: bool, pieces) -> tuple[str, str, int]:
    parser = ReasoningParser(syntax, thinking)
    out = [item for piece in pieces for item in parser.feed(piece)] + parser.finish()
    reasoning = "".join(c.text for c in out if isinstance(c, ReasoningDelta))
    answer = "".join(c.text for c in out if isinstance(c, TextDelta))
    return reasoning, answer, parser.tokens


# ------------------------------------------------------------------ the parser
def test_markers_are_read_off_the_template():
    assert reasoning_syntax(THINKING_TEMPLATE) == THINK
    assert reasoning_syntax("{{ '<|start|>assistant<|channel|>analysis<|message|>' }}") == CHANNELS
    assert reasoning_syntax("{% for m in messages %}{{ m['content'] }}{% endfor %}") is None
    assert opens_thinking(THINK, "<|im_start|>assistant\n<think>\n")
    assert not opens_thinking(THINK, "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_a_prompt_that_opened_the_thought_splits_at_the_close_marker_one_character_at_a_time():
    assert split(THINK, True, list("\nLet me think.\n</think>\n\nHello!")) == ("Let me think.", "Hello!", 23)


def test_a_marker_split_across_tokens_is_still_a_marker():
    assert split(THINK, True, ["a <", "/th", "ink", "> b"])[:2] == ("a", "b")
    assert split(THINK, False, ["  <th", "ink>hmm</thi", "nk>ok"])[:2] == ("hmm", "ok")


def test_text_that_merely_contains_a_marker_later_is_all_answer():
    assert split(THINK, False, list("Hello <think> there")) == ("", "Hello <think> there", 0)
    assert split(THINK, False, ["  "]) == ("", "  ", 0)


def test_gpt_oss_channels():
    pieces = ["<|channel|>analysis<|message|>", "Think", " more", "<|end|>", "<|start|>assistant",
              "<|channel|>final<|message|>", "Answer"]
    assert split(CHANNELS, False, pieces)[:2] == ("Think more", "Answer")


def test_a_thought_cut_off_by_max_tokens_is_all_reasoning():
    assert split(THINK, True, list("no close at all  "))[:2] == ("no close at all", "")


# ------------------------------------------------------------------ a real thinking model
@pytest.fixture(scope="session")
def think(think_server):
    return sdk_client(think_server)


def ask(client, content: str = "Give me a JSON object about a dog.", **extra):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          temperature=0, **extra)


def test_a_budget_cuts_the_thought_and_forces_the_answer(think, validate):
    raw = think.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Give me a JSON object about a dog."}], temperature=0,
        max_tokens=30, extra_body={"thinking_budget_tokens": 4})
    validate(raw.http_response.json(), "CreateChatCompletionResponse")
    r = raw.parse()
    message = r.choices[0].message.model_dump()
    assert message["reasoning_content"] and "</think>" not in message["reasoning_content"]
    assert message["content"] and "<think>" not in message["content"]
    assert r.usage.completion_tokens_details.reasoning_tokens == 4
    assert r.usage.prompt_tokens < 30 and r.usage.completion_tokens <= 30


def test_reasoning_streams_before_the_answer(think, think_server, validate):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Give me a JSON object about a dog."}],
            "temperature": 0, "max_tokens": 20, "stream": True, "stream_options": {"include_usage": True},
            "thinking_budget_tokens": 4}
    with httpx.stream("POST", think_server.url + "/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                validate(json.loads(line[6:]), "CreateChatCompletionStreamResponse")
    stream = ask(think, max_tokens=20, stream=True, stream_options={"include_usage": True},
                 extra_body={"thinking_budget_tokens": 4})
    kinds, usage = [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            if delta.get("reasoning_content"):
                kinds.append("reasoning")
            elif delta.get("content"):
                kinds.append("content")
    assert kinds[0] == "reasoning" and "content" in kinds
    assert kinds.index("content") > max(i for i, k in enumerate(kinds) if k == "reasoning")
    assert usage.completion_tokens_details.reasoning_tokens == 4


def test_effort_none_turns_thinking_off_through_the_template(think):
    r = ask(think, "What is 2+2?", max_tokens=12, reasoning_effort="none")
    message = r.choices[0].message.model_dump()
    assert message.get("reasoning_content") is None and message["content"]
    assert r.usage.completion_tokens_details is None  # no empty reasoning fields


def test_a_budget_of_zero_answers_at_once(think):
    r = ask(think, "What is 2+2?", max_tokens=12, extra_body={"thinking_budget_tokens": 0})
    message = r.choices[0].message.model_dump()
    assert message.get("reasoning_content") is None and message["content"]


def test_structured_output_constrains_the_answer_not_the_thought(think):
    r = ask(think, max_tokens=60, response_format={"type": "json_object"}, extra_body={"thinking_budget_tokens": 5})
    message = r.choices[0].message.model_dump()
    assert message["reasoning_content"]
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(message["content"]), dict)
    else:  # cut by max_tokens: still the start of an object
        assert message["content"].lstrip().startswith("{")


def test_a_lazy_grammar_leaves_an_open_thought_free(think):
    """Without a budget the thought is never closed by this model: the grammar, applied only after
    the close marker, must leave the reasoning free (no JSON forced into it)."""
    r = ask(think, "Tell me about dogs.", max_tokens=12, response_format={"type": "json_object"})
    message = r.choices[0].message.model_dump()
    assert r.choices[0].finish_reason == "length" and message["reasoning_content"]


def test_a_budget_needs_one_choice(think):
    with pytest.raises(openai.BadRequestError) as info:
        ask(think, max_tokens=5, n=2, extra_body={"thinking_budget_tokens": 3})
    assert info.value.body["param"] == "thinking_budget_tokens"


def test_a_thinking_answer_is_cached_with_its_reasoning(think_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a cat."}], "temperature": 0,
            "max_tokens": 16, "thinking_budget_tokens": 3}
    first = httpx.post(think_server.url + "/chat/completions", json=body, timeout=60)
    second = httpx.post(think_server.url + "/chat/completions", json=body, timeout=60)
    assert second.headers["x-shimmy-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["usage"] == first.json()["usage"]


def test_a_model_that_does_not_think_gets_no_reasoning_fields(client):
    from tests.conftest import MODEL_ID

    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, reasoning_effort="high")
    assert "reasoning_content" not in r.choices[0].message.model_dump(exclude_none=True)
    assert r.usage.completion_tokens_details is None


# ------------------------------------------------------------------ scope (a scripted model: the logic alone)
def test_a_tool_call_written_inside_the_thought_is_not_a_call(validate, tmp_path):
    import dataclasses

    from tests.test_function_calling import FORMATS, WEATHER, ScriptedModel, make_api_for

    class Thinking(ScriptedModel):
        def prepare(self, request):
            return dataclasses.replace(super().prepare(request), reasoning=THINK, thinking=True)

    api = make_api_for(validate, tmp_path, Thinking())
    api.model.outputs = ["I could write " + FORMATS["hermes"] + " but no.</think>It is sunny."]
    body = api.ok(tools=[WEATHER])
    message = body["choices"][0]["message"]
    assert "tool_calls" not in message and body["choices"][0]["finish_reason"] == "stop"
    assert "<tool_call>" in message["reasoning_content"] and message["content"] == "It is sunny."
    api.model.outputs = ["Let me call it.</think>" + FORMATS["hermes"]]
    message = api.ok(tools=[WEATHER])["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert message["reasoning_content"] == "Let me call it."


# ------------------------------------------------------------------ the Responses API on the thinking model
@pytest.fixture(scope="session")
def budget_server(start_server, thinking_model):
    """The thinking model with a server-wide budget (--reasoning-budget 4): every request thinks
    for four tokens, then answers."""
    return serve_model(start_server, thinking_model, "--reasoning-budget", "4")


def test_responses_have_a_reasoning_item_and_reasoning_tokens(budget_server, validate):
    body = {"model": MODEL, "input": "Give me a JSON object about a dog.", "max_output_tokens": 20,
            "temperature": 0}
    response = httpx.post(budget_server.url + "/responses", json=body, timeout=60).json()
    validate(response, "Response")
    kinds = [item["type"] for item in response["output"]]
    assert kinds == ["reasoning", "message"], kinds
    assert response["output"][0]["content"][0]["type"] == "reasoning_text"
    assert response["output"][0]["content"][0]["text"]
    assert response["usage"]["output_tokens_details"]["reasoning_tokens"] == 4
    events = []
    with httpx.stream("POST", budget_server.url + "/responses", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    for event in events:
        validate(event, "ResponseStreamEvent")
    types = [e["type"] for e in events]
    assert "response.reasoning_text.delta" in types and "response.reasoning_text.done" in types
    assert types.index("response.reasoning_text.done") < types.index("response.output_text.delta")


def test_a_server_budget_applies_to_chat_too(budget_server):
    r = sdk_client(budget_server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give me a JSON object about a dog."}], temperature=0,
        max_tokens=16)
    assert r.usage.completion_tokens_details.reasoning_tokens == 4 and r.choices[0].message.content
