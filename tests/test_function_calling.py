"""OpenAI function calling: tools and tool_choice into the prompt, tool calls recognised in every
common format (whole and streamed, with the same result), OpenAI's response and delta shapes, the
round trip of calls and results, the server-side loop (limits, invalid arguments, mixed turns,
the text protocol) in-process over a scripted fake model; then end to end over SmolLM2 with the
openai SDK, where grammars make even a 135M model call tools correctly."""

from __future__ import annotations

import importlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import falcon.testing
import httpx
import jsonschema
import openai
import pytest

from shimmy_core.app import build, create_app
from shimmy_core.contract.generation import (
    Finish,
    GenerationRequest,
    PreparedPrompt,
    SamplingParams,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from shimmy_core.chat_template import CHATML_FALLBACK, ChatTemplate
from shimmy_core.contract.hookspecs import hookimpl
from shimmy_core.contract.model_info import DiscoveryResult, ModelInfo
from shimmy_plugins.dialects.openai.openai_requests import parse_request
from shimmy_core.plugin_manager import create_plugin_manager
from shimmy_core.service import CompletionService
from shimmy_core.contract.settings import Settings
from shimmy_core.stops import StopScanner
from shimmy_core.tools.calls import ToolCallParser, parse_text
from shimmy_core.tools.tool_prompts import render_chat, template_supports_tools
from shimmy_plugins.backends.gguf.gbnf import compile_output
from tests.conftest import builtin, BUILTIN_PLUGINS, MODEL_ID

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "tools"
FAKE = "scripted"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time.",
                                          "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_TEXT = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'

# A template that knows tools, in the style of Qwen 2.5's (tools listed in the system turn, calls
# and results in <tool_call>/<tool_response> tags).
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ------------------------------------------------------------------ a scripted fake model
def grammar_of(params: SamplingParams) -> str | None:
    """The GBNF the GGUF backend would sample these parameters under."""
    return compile_output(params.output) if params.output is not None else None


class ScriptedModel:
    """Generates the texts it is given, one per generation, in 3-character pieces (stop strings
    applied), and remembers every request and its parameters."""

    context_length = 8192

    def __init__(self, template: str | None = None, renders_tools: bool = False):
        self.outputs: list[str] = []
        self.requests: list[GenerationRequest] = []
        self.prompts: list[str] = []
        self.params: list[SamplingParams] = []
        self.template = ChatTemplate(template) if template else None
        self.renders_tools = renders_tools

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        self.requests.append(request)
        if request.params.output is not None:  # refuses what the GGUF backend refuses
            compile_output(request.params.output)
        if self.template is not None:
            text = render_chat(self.template, list(request.messages), request.tools)
        else:
            text = "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in request.messages or ())
        self.prompts.append(text)
        return PreparedPrompt(text=text, tokens=tuple(range(len(text) // 4 + 1)),
                              max_tokens=request.params.max_tokens or 1000, stop=request.params.stop)

    def generate(self, prepared: PreparedPrompt, params: SamplingParams, cancelled):
        self.params.append(params)
        out = self.outputs.pop(0) if self.outputs else "Hello."
        scanner = StopScanner(prepared.stop)
        generated, reason = 0, "stop"
        for i in range(0, len(out), 3):
            if generated >= prepared.max_tokens:
                reason = "length"
                break
            generated += 1
            text, stopped = scanner.feed(out[i:i + 3])
            if text:
                yield TextDelta(text)
            if stopped:
                break
        else:
            tail = scanner.flush()
            if tail:
                yield TextDelta(tail)
        yield Finish(reason)
        yield Usage(len(prepared.tokens), generated)

    def close(self) -> None:
        pass


class ScriptedPlugin:
    def __init__(self, model: ScriptedModel):
        self.model = model

    @hookimpl
    def shimmy_register_sources(self, register, settings):
        class Source:
            name = "scripted"

            def discover(self):
                return DiscoveryResult(models=[ModelInfo(id=FAKE, format="scripted", path="/nonexistent/scripted",
                                                         source="scripted", context_length=8192)])

        register(Source())

    @hookimpl
    def shimmy_register_backends(self, register):
        model = self.model

        class Backend:
            name = "scripted"
            formats = ("scripted",)

            def unavailable_reason(self):
                return None

            def load(self, info, settings):
                return model

        register(Backend())


BUILTIN_TOOLS = ("tools_calculator", "tools_files", "tools_http")


@dataclass
class Api:
    client: falcon.testing.TestClient
    model: ScriptedModel
    shimmy: object
    validate: Callable
    made: list = field(default_factory=list)

    def chat(self, **body) -> falcon.testing.Result:
        body.setdefault("model", FAKE)
        body.setdefault("messages", ASK)
        return self.client.simulate_post("/v1/chat/completions", json=body)

    def ok(self, **body) -> dict:
        result = self.chat(**body)
        assert result.status_code == 200, result.text
        self.validate(result.json, "CreateChatCompletionResponse")
        return result.json

    def events(self, **body) -> list[dict]:
        result = self.chat(stream=True, **body)
        assert result.status_code == 200, result.text
        events = [json.loads(b[len("data: "):]) for b in result.text.split("\n\n") if b and b != "data: [DONE]"]
        assert result.text.endswith("data: [DONE]\n\n")
        for event in events:
            self.validate(event, "CreateChatCompletionStreamResponse")
        return events

    def error(self, status: int = 400, **body) -> dict:
        result = self.chat(**body)
        assert result.status_code == status, result.text
        self.validate(result.json, "ErrorResponse")
        return result.json["error"]


def make_api_for(validate, tmp_path: Path, model: ScriptedModel | None = None, **overrides) -> Api:
    settings = Settings.load({"demo": False}, {}).replace(home=tmp_path, **overrides)
    model = model or ScriptedModel()
    plugins = [("scripted", ScriptedPlugin(model)), builtin("openai")]
    plugins += [(name, importlib.import_module(BUILTIN_PLUGINS[name])) for name in BUILTIN_TOOLS]
    pm = create_plugin_manager(load_entry_points=False, extra_plugins=plugins)
    shimmy = build(settings, pm)
    # Falcon's simulated requests say Host: falconframework.org, which the DNS-rebinding check refuses.
    client = falcon.testing.TestClient(create_app(shimmy), headers={"Host": "localhost"})
    return Api(client, model, shimmy, validate)


@pytest.fixture
def make_api(validate, tmp_path, monkeypatch):
    for var in ("SHIMMY_DISABLE_PLUGINS", "SHIMMY_LOAD_PLUGINS", "SHIMMY_TRACE_HOOKS"):
        monkeypatch.delenv(var, raising=False)
    made = []

    def make(model: ScriptedModel | None = None, **overrides) -> Api:
        api = make_api_for(validate, tmp_path, model, **overrides)
        made.append(api)
        return api

    yield make
    for api in made:
        api.shimmy.close()


@pytest.fixture
def api(make_api) -> Api:
    return make_api()


def deltas_to_calls(events: list[dict]) -> list[dict]:
    """Join streamed tool-call deltas the way the openai SDK does."""
    calls: dict[int, dict] = {}
    for event in events:
        for choice in event["choices"]:
            for delta in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(delta["index"], {"id": None, "name": "", "arguments": ""})
                if "id" in delta:
                    call["id"] = delta["id"]
                    call["name"] = delta["function"]["name"]
                call["arguments"] += delta.get("function", {}).get("arguments", "")
    return [calls[i] for i in sorted(calls)]


# ------------------------------------------------------------------ formats
FORMATS = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
    "llama3_python_tag": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
    "mistral_v11": '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}',
    "plain_json": CALL_TEXT,
    "openai_shape": '{"function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"unit\\": \\"celsius\\"}"}}',
    "fenced": '```json\n' + CALL_TEXT + '\n```',
    "arguments_first": '{"arguments": {"city": "Paris", "unit": "celsius"}, "name": "get_weather"}',
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_tool_call_formats_are_recognised(name):
    parsed = parse_text(FORMATS[name], {"get_weather"})
    assert parsed.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})]
    assert parsed.calls[0].id.startswith("call_") and len(parsed.calls[0].id) == 29


def _stream(text: str, names, text_tools=(), seed=0):
    rng = random.Random(seed)
    parser = ToolCallParser(names, text_tools)
    out, i = [], 0
    while i < len(text):
        j = i + rng.randint(1, 5)
        out += parser.feed(text[i:j])
        i = j
    out += parser.finish()
    content = "".join(o.text for o in out if isinstance(o, TextDelta))
    calls: dict[int, list] = {}
    for o in out:
        if isinstance(o, ToolCallDelta):
            if o.id is not None:  # a call's first delta: id and name, no arguments yet
                assert o.name and o.arguments == ""
                calls[o.call_index] = [o.name, ""]
            calls[o.call_index][1] += o.arguments
    return content, [tuple(calls[i]) for i in sorted(calls)], parser.text_call


MIXED = [
    *FORMATS.values(),
    "Just text, no call.",
    "  leading spaces stay",
    'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
    '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    '{"answer": 42}',
    '{"name": "not_a_tool", "arguments": {}}',
    "[1, 2] is a list",
    "I like the <tool_call> tag",
    'Two: {"name": "get_time", "arguments": {}}',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
    "Result: <tool>calc:2*(3+4)",
    "Not mine: <tool>other:1</tool> ok",
]


@pytest.mark.parametrize("text", MIXED)
def test_streamed_parsing_equals_whole_parsing(text):
    whole = parse_text(text, {"get_weather", "get_time"}, {"calc"})
    expected = (whole.content, [(c.name, c.arguments) for c in whole.calls],
                whole.text_call and (whole.text_call.prefix, whole.text_call.argument))
    for seed in range(25):
        content, calls, text_call = _stream(text, {"get_weather", "get_time"}, {"calc"}, seed)
        assert (content, calls, text_call and (text_call.prefix, text_call.argument)) == expected, seed
    if "<tool" not in text and not whole.calls:
        assert whole.content == text  # text that is no call passes through unchanged


def test_text_before_a_call_is_content_and_grammar_output_streams_its_arguments():
    parsed = parse_text(MIXED[11], {"get_weather", "get_time"})
    assert parsed.content == "Sure."
    assert [c.name for c in parsed.calls] == ["get_weather", "get_time"]
    parser = ToolCallParser({"get_weather"})
    first = parser.feed('{"name": "get_weather", "arguments": {"city"')
    assert isinstance(first[0], ToolCallDelta) and first[0].name == "get_weather" and first[0].arguments == ""
    assert first[1].arguments == '{"city"'  # arguments pass on before the call is complete
    assert parser.feed(': "Rome"') == [ToolCallDelta(0, None, None, ': "Rome"')]


# ------------------------------------------------------------------ prompts
def test_generic_instruction_for_templates_without_tools(api):
    api.model.outputs = ["Hello."]
    api.ok(tools=[WEATHER])
    request = api.model.requests[-1]
    assert request.tools is None  # the fake does not render tools: the core wrote them in
    system = request.messages[0]
    assert system["role"] == "system" and "<tools>" in system["content"] and '"get_weather"' in system["content"]
    assert "<tool_call>" in system["content"]


def test_tool_choice_none_hides_tools_and_parses_nothing(api):
    api.model.outputs = [CALL_TEXT]
    body = api.ok(tools=[WEATHER], tool_choice="none")
    assert body["choices"][0]["message"]["content"] == CALL_TEXT
    assert "tool_calls" not in body["choices"][0]["message"]
    assert api.model.requests[-1].messages == tuple(ASK)


def test_native_template_gets_tools_calls_and_results(make_api):
    model = ScriptedModel(TOOLS_TEMPLATE, renders_tools=True)
    api = make_api(model)
    assert template_supports_tools(model.template)
    model.outputs = ["It is 18 degrees."]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    body = api.ok(messages=messages, tools=[WEATHER])
    assert body["choices"][0]["message"]["content"] == "It is 18 degrees."
    prompt = model.prompts[-1]
    assert '"name": "get_weather"' in prompt  # the tool, from the template's own tools loop
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in prompt
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in prompt
    assert model.requests[-1].tools[0]["function"]["name"] == "get_weather"


def test_round_trip_with_a_template_without_tools(make_api):
    model = ScriptedModel(CHATML_FALLBACK, renders_tools=True)
    api = make_api(model)
    assert not template_supports_tools(model.template)
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
        {"role": "tool", "tool_call_id": "call_2", "content": "windy"},
    ]
    api.ok(messages=messages, tools=[WEATHER])
    prompt = model.prompts[-1]
    assert "<tools>" in prompt
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call><|im_end|>' in prompt
    # both results in one user turn
    assert "<|im_start|>user\n<tool_response>\n18 degrees\n</tool_response>\n<tool_response>\nwindy\n</tool_response><|im_end|>" in prompt


def test_round_trip_without_tools_in_the_follow_up(api):
    api.model.outputs = ["It is 18 degrees."]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
    ]
    api.ok(messages=messages)
    sent = api.model.requests[-1].messages
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert sent[2]["content"] == "<tool_response>\n18 degrees\n</tool_response>"


# ------------------------------------------------------------------ responses
def test_named_tool_choice_response_shape_and_grammar(api):
    api.model.outputs = [CALL_TEXT]
    body = api.ok(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    grammar = grammar_of(api.model.params[-1])
    assert grammar and '"\\"get_weather\\""' in grammar and "get_time" not in grammar


def test_required_grammar_offers_every_tool_and_one_call_unless_parallel_is_true(api):
    api.model.outputs = [CALL_TEXT, CALL_TEXT]
    api.ok(tools=[WEATHER, TIME], tool_choice="required")
    grammar = grammar_of(api.model.params[-1])
    assert "get_weather" in grammar and "get_time" in grammar and '"\\n" call' not in grammar
    api.ok(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=True)
    assert '"\\n" call' in grammar_of(api.model.params[-1])


def test_allowed_tools_choice_restricts_the_tools(api):
    api.model.outputs = [CALL_TEXT]
    api.ok(tools=[WEATHER, TIME], tool_choice={"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "get_time"}}]}})
    grammar = grammar_of(api.model.params[-1])
    assert "get_time" in grammar and "get_weather" not in grammar


def test_auto_returns_text_or_calls(api):
    api.model.outputs = ["It is sunny.", "Let me look.\n" + FORMATS["hermes"]]
    body = api.ok(tools=[WEATHER])
    assert body["choices"][0]["message"]["content"] == "It is sunny."
    assert body["choices"][0]["finish_reason"] == "stop" and grammar_of(api.model.params[-1]) is None
    body = api.ok(tools=[WEATHER])
    message = body["choices"][0]["message"]
    assert message["content"] == "Let me look." and message["tool_calls"][0]["function"]["name"] == "get_weather"


def test_streamed_tool_call_deltas(api):
    api.model.outputs = [CALL_TEXT]
    events = api.events(tools=[WEATHER], tool_choice="required", stream_options={"include_usage": True})
    tool_events = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("tool_calls")]
    head = tool_events[0]["choices"][0]["delta"]["tool_calls"][0]
    assert head["index"] == 0 and head["id"].startswith("call_") and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    pieces = [e["choices"][0]["delta"]["tool_calls"][0] for e in tool_events[1:]]
    assert len(pieces) > 1 and all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in pieces)
    [call] = deltas_to_calls(events)
    assert json.loads(call["arguments"]) == {"city": "Paris", "unit": "celsius"}
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finishes == ["tool_calls"]
    assert events[-1]["usage"]["completion_tokens"] > 0
    api.model.outputs = [CALL_TEXT]
    whole = api.ok(tools=[WEATHER], tool_choice="required")
    assert whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == call["arguments"]


# ------------------------------------------------------------------ request validation
BAD = [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "https://example.com/s.json"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"not": {"type": "string"}}}}}}], "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                                         "function": {"name": "f"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
]


@pytest.mark.parametrize("extra,param", BAD, ids=[p for _, p in BAD])
def test_bad_tool_requests_are_400(api, extra, param):
    error = api.error(**extra)
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_unenforceable_tool_schema_names_the_feature(api):
    error = api.error(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "format": "uri"}}}}}], tool_choice="required")
    assert error["code"] == "unsupported_schema" and "format: uri" in error["message"]


# ------------------------------------------------------------------ the server-side loop
CALC_CALL = '{"name": "calculator", "arguments": {"expression": "2*(3+4)"}}'
CALCULATOR = {"type": "function", "function": {"name": "calculator"}}


def test_server_side_loop_runs_the_calculator(make_api):
    api = make_api(enable_tools=("calculator",))
    api.model.outputs = [CALC_CALL, "The answer is 14."]
    body = api.ok(messages=[{"role": "user", "content": "What is 2*(3+4)?"}], tools=[CALCULATOR],
                  tool_choice={"type": "function", "function": {"name": "calculator"}})
    message = body["choices"][0]["message"]
    assert message["content"] == "The answer is 14." and body["choices"][0]["finish_reason"] == "stop"
    assert "tool_calls" not in message
    [run] = message["executed_tool_calls"]
    assert run["function"]["name"] == "calculator" and run["output"] == "14" and run["is_error"] is False
    assert json.loads(run["function"]["arguments"]) == {"expression": "2*(3+4)"}
    # the second turn saw the call and its result, and was not forced to call again
    second = api.model.requests[-1]
    assert "14" in second.messages[-1]["content"] and second.messages[-1]["role"] == "user"
    assert second.params.output is None
    assert body["usage"]["completion_tokens"] == sum(1 for _ in range(0, len(CALC_CALL), 3)) + 6


def test_server_side_loop_streams_the_answer_and_the_runs(make_api):
    api = make_api(enable_tools=("calculator",))
    api.model.outputs = [CALC_CALL, "It is 14."]
    events = api.events(messages=[{"role": "user", "content": "2*(3+4)?"}], tools=[CALCULATOR],
                        tool_choice={"type": "function", "function": {"name": "calculator"}})
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert not any(d.get("tool_calls") for d in deltas)  # the server's calls are not the client's
    runs = [r for d in deltas for r in d.get("executed_tool_calls", [])]
    assert [r["output"] for r in runs] == ["14"]
    assert "".join(d.get("content") or "" for d in deltas) == "It is 14."
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_invalid_arguments_go_back_to_the_model_and_the_tool_does_not_run(make_api):
    api = make_api(enable_tools=("calculator",))
    api.model.outputs = ['{"name": "calculator", "arguments": {"formula": "1+1"}}', "Sorry."]
    body = api.ok(tools=[CALCULATOR])
    [run] = body["choices"][0]["message"]["executed_tool_calls"]
    assert run["is_error"] and "invalid arguments" in run["output"] and "did not run" in run["output"]
    assert "'expression' is a required property" in api.model.requests[-1].messages[-1]["content"]


def test_a_server_call_cut_off_by_max_tokens_is_reported_not_dropped(make_api):
    """A server-side call whose arguments max_tokens cut off does not run, and the response says
    so in executed_tool_calls, with finish_reason length; streamed and not."""
    api = make_api(enable_tools=("calculator",))
    api.model.outputs = [CALC_CALL]
    body = api.ok(tools=[CALCULATOR], max_tokens=8,
                  tool_choice={"type": "function", "function": {"name": "calculator"}})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    [run] = choice["message"]["executed_tool_calls"]
    assert run["is_error"] is True and "cut off" in run["output"] and "did not run" in run["output"]
    assert run["function"]["name"] == "calculator"
    assert CALC_CALL.startswith('{"name": "calculator", "arguments": ' + run["function"]["arguments"])
    assert len(api.model.requests) == 1  # the model was not asked again

    api.model.outputs = [CALC_CALL]
    events = api.events(tools=[CALCULATOR], max_tokens=8,
                        tool_choice={"type": "function", "function": {"name": "calculator"}})
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    [run] = [r for d in deltas for r in d.get("executed_tool_calls", [])]
    assert run["is_error"] is True and "cut off" in run["output"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_a_client_call_cut_off_by_max_tokens_comes_back_partial(make_api):
    """A call for the client cut off by max_tokens comes back as it stands, with finish_reason
    length, so the client sees what happened."""
    api = make_api()
    api.model.outputs = ['{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}']
    body = api.ok(tools=[WEATHER], max_tokens=17, tool_choice="required")
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and call["function"]["arguments"].startswith('{"city"')
    with pytest.raises(ValueError):
        json.loads(call["function"]["arguments"])  # incomplete, as the model left it


def test_loop_stops_at_the_step_limit_with_an_answer(make_api):
    api = make_api(enable_tools=("calculator",), tool_max_steps=2)
    api.model.outputs = [CALC_CALL, CALC_CALL, CALC_CALL + " and that is all"]
    body = api.ok(tools=[CALCULATOR], tool_choice="required")
    message = body["choices"][0]["message"]
    assert len(message["executed_tool_calls"]) == 2
    assert len(api.model.requests) == 3
    last = api.model.requests[-1]
    assert last.params.output is None and "<tools>" not in json.dumps(last.messages)
    assert message["content"].endswith("and that is all") and "tool_calls" not in message


def test_a_turn_with_client_calls_returns_them_after_running_the_servers(make_api):
    api = make_api(enable_tools=("calculator",))
    api.model.outputs = [FORMATS["hermes"].replace("</tool_call>", "</tool_call>\n<tool_call>" + CALC_CALL + "</tool_call>")]
    body = api.ok(tools=[WEATHER, CALCULATOR])
    message = body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    assert [r["function"]["name"] for r in message["executed_tool_calls"]] == ["calculator"]


def test_text_protocol_runs_enabled_tools(make_api):
    api = make_api(enable_tools=("calculator",))
    api.model.outputs = ["Let me see. <tool>calc:2*(3+4)</tool> never generated", " So it is 14."]
    body = api.ok(messages=[{"role": "user", "content": "2*(3+4)?"}])
    message = body["choices"][0]["message"]
    assert message["content"] == "Let me see. <tool>calc:2*(3+4)</tool> So it is 14."
    assert [r["output"] for r in message["executed_tool_calls"]] == ["14"]
    assert api.model.requests[0].params.stop[-1] == "</tool>"
    assert api.model.requests[-1].messages[-1]["content"] == "<tool_result>\n14\n</tool_result>"


def test_text_protocol_is_inert_for_tools_not_enabled(api):
    api.model.outputs = ["<tool>calc:1+1</tool> done"]
    body = api.ok()
    assert body["choices"][0]["message"]["content"] == "<tool>calc:1+1</tool> done"
    assert "</tool>" not in api.model.requests[0].params.stop


def test_run_says_when_it_uses_server_tools(make_api):
    api = make_api(enable_tools=("calculator",))
    service = CompletionService(api.shimmy.catalog, api.shimmy.manager, api.shimmy.settings, api.shimmy.tools)

    def start(**body):
        body = {"model": FAKE, "messages": ASK, **body}
        return service.start(parse_request("chat", body, 4))

    api.model.outputs = ["plain"]
    run = start()
    assert run.uses_server_tools is False
    list(run.events())
    assert run.uses_server_tools is False
    api.model.outputs = ["x", "y"]
    assert start(tools=[CALCULATOR]).uses_server_tools is True
    api.model.outputs = ["<tool>calc:1+1</tool>", "2"]
    run = start()
    assert run.uses_server_tools is False
    list(run.events())
    assert run.uses_server_tools is True  # a text-protocol tool ran


def test_server_tools_need_one_choice(make_api):
    api = make_api(enable_tools=("calculator",))
    assert api.error(tools=[CALCULATOR], n=2)["param"] == "n"


def test_request_definitions_of_enabled_tools_are_the_servers(make_api):
    api = make_api(enable_tools=("calculator",))
    api.model.outputs = ["fine"]
    fake = {"type": "function", "function": {"name": "calculator", "description": "mine",
                                             "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}
    api.ok(tools=[fake])
    assert "safe" not in json.dumps(api.model.requests[-1].messages)
    assert '"expression"' in api.model.requests[-1].messages[0]["content"]


# ------------------------------------------------------------------ end to end over SmolLM2
@pytest.fixture(scope="module")
def tool_server(start_server, smollm2_path):
    srv = start_server(["--model", str(smollm2_path), "--no-demo", "--enable-tool", "calculator",
                        "--tools-dir", str(EXAMPLES)])
    httpx.get(srv.base + "/health", timeout=30).raise_for_status()
    return srv


@pytest.fixture(scope="module")
def tool_client(tool_server):
    return openai.OpenAI(base_url=tool_server.url, api_key="sk-local", max_retries=0, timeout=300)


def _valid_weather(arguments: str) -> dict:
    args = json.loads(arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    return args


def test_e2e_named_tool_choice(tool_client, tool_server, validate):
    r = tool_client.chat.completions.create(
        model=MODEL_ID, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    _valid_weather(call.function.arguments)
    raw = httpx.post(tool_server.url + "/chat/completions", timeout=300, json={
        "model": MODEL_ID, "messages": ASK, "tools": [WEATHER], "temperature": 0.8, "seed": 3, "max_tokens": 80,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}).json()
    validate(raw, "CreateChatCompletionResponse")
    _valid_weather(raw["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])


def test_e2e_required_streamed(tool_client):
    stream = tool_client.chat.completions.create(
        model=MODEL_ID, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=80,
        stream=True)
    chunks = [c for c in stream if c.choices]
    heads = [d for c in chunks for d in (c.choices[0].delta.tool_calls or []) if d.id]
    assert len(heads) == 1 and heads[0].index == 0 and heads[0].type == "function"
    assert heads[0].function.name == "get_weather" and heads[0].function.arguments == ""
    arguments = "".join(d.function.arguments or "" for c in chunks for d in (c.choices[0].delta.tool_calls or []))
    assert sum(1 for c in chunks for _ in (c.choices[0].delta.tool_calls or [])) > 2  # in pieces
    _valid_weather(arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_e2e_round_trip(tool_client):
    call = {"id": "call_abc", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    r = tool_client.chat.completions.create(
        model=MODEL_ID, tools=[WEATHER], temperature=0, max_tokens=30, tool_choice="none",
        messages=ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees and sunny"}])
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")


def test_e2e_auto_has_the_right_shape(tool_client):
    r = tool_client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[WEATHER], temperature=0,
                                            max_tokens=40)
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        assert all(c.function.name == "get_weather" for c in choice.message.tool_calls)
    else:
        assert choice.message.content is not None and choice.finish_reason in ("stop", "length")


def test_e2e_server_side_calculator(tool_client):
    """The forced call always shows in executed_tool_calls: run, or (when the model spends
    max_tokens inside the arguments, as this small model does on some CPUs) reported as cut off."""
    r = tool_client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Compute 2*(3+4) with the calculator."}],
        tools=[CALCULATOR], tool_choice={"type": "function", "function": {"name": "calculator"}},
        temperature=0, max_tokens=60)
    choice = r.choices[0]
    runs = choice.message.model_extra["executed_tool_calls"]
    assert runs and runs[0]["function"]["name"] == "calculator"
    if runs[0]["is_error"] and "cut off" in runs[0]["output"]:
        assert choice.finish_reason == "length" and len(runs) == 1
    else:
        assert "expression" in json.loads(runs[0]["function"]["arguments"])
    assert choice.message.tool_calls is None  # the server ran its tool itself
    assert choice.finish_reason in ("stop", "length") and choice.message.content is not None


def test_e2e_server_call_cut_off_is_reported(tool_client):
    r = tool_client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Compute 2*(3+4) with the calculator."}],
        tools=[CALCULATOR], tool_choice={"type": "function", "function": {"name": "calculator"}},
        temperature=0, max_tokens=4)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    [run] = choice.message.model_extra["executed_tool_calls"]
    assert run["function"]["name"] == "calculator" and run["is_error"] and "did not run" in run["output"]


def test_e2e_tools_endpoint_lists_the_tools(tool_server):
    body = httpx.get(tool_server.url + "/tools", timeout=30).json()
    tools = {t["name"]: t for t in body["data"]}
    assert tools["calculator"]["enabled"] is True
    assert tools["get_weather"]["executable"] is False and tools["get_weather"]["enabled"] is False
    assert tools["file_read"]["enabled"] is False and tools["file_read"]["unavailable_reason"]
    assert tools["word_count"]["function"]["parameters"]["required"] == ["text"]
