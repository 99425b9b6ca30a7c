"""The OpenAI wire format in-process: Falcon's TestClient over ``create_app``
with a small fake backend (whitespace tokens, deterministic words), so that
validation, errors, streaming framing and the official schemas are checked
without a real model.  The real model is covered by ``test_e2e_openai.py``."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import falcon.testing
import pytest

from shimmy_core.app import build, create_app
from shimmy_core.contract.generation import (
    ContextLengthExceeded,
    Finish,
    GenerationRequest,
    PreparedPrompt,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from shimmy_core.contract.hookspecs import hookimpl
from shimmy_core.contract.model_info import DiscoveryResult, ModelInfo
from shimmy_core.plugin_manager import create_plugin_manager
from shimmy_core.contract.settings import Settings
from shimmy_core.stops import StopScanner
from tests.conftest import builtin

MODEL = "fake"
CONTEXT = 64
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")
# Magic words the fake backend reacts to, to simulate server-side failures.
BOOM_PREPARE = "BOOM_PREPARE"
BOOM_GENERATE = "BOOM_GENERATE"
SECRET = "secret-internal-detail"
HI = [{"role": "user", "content": "Say hello."}]
PLUGIN_ENV = ("SHIMMY_DISABLE_PLUGINS", "SHIMMY_LOAD_PLUGINS", "SHIMMY_TRACE_HOOKS")


# ------------------------------------------------------------------ the fake plugin
def fake_output(params: SamplingParams) -> list[str]:
    """The tokens the fake model generates: the words, rotated by the seed, space-separated."""
    shift = (params.seed or 0) % len(WORDS)
    words = WORDS[shift:] + WORDS[:shift]
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


class FakeModel:
    """Tokenizes by whitespace; generates :data:`WORDS` (then stops) with stop strings applied."""

    context_length = CONTEXT

    def __init__(self) -> None:
        self.prepared: list[GenerationRequest] = []
        self.generated: list[tuple[PreparedPrompt, SamplingParams]] = []
        self.closed = False

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        self.prepared.append(request)
        if request.messages is not None:
            text = "\n".join(f"{m['role']}: {m['content'] or ''}" for m in request.messages)
            param = "messages"
        else:
            text, param = request.prompt or "", "prompt"
        if BOOM_PREPARE in text:
            raise RuntimeError(SECRET)
        tokens = text.split()
        requested = request.params.max_tokens
        if len(tokens) > CONTEXT:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {CONTEXT} tokens; the {param} has {len(tokens)}.",
                param=param,
            )
        if requested is not None and len(tokens) + requested > CONTEXT:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {CONTEXT} tokens; you asked for "
                f"{len(tokens) + requested}.",
                param="max_tokens",
            )
        limit = min(requested or CONTEXT, CONTEXT - len(tokens))
        ids = tuple(hash(t) & 0xFFFF for t in tokens)
        return PreparedPrompt(text=text, tokens=ids, max_tokens=limit, stop=request.params.stop)

    def generate(
        self, prepared: PreparedPrompt, params: SamplingParams, cancelled: Callable[[], bool]
    ) -> Iterator:
        self.generated.append((prepared, params))
        scanner = StopScanner(prepared.stop)
        generated, reason = 0, "stop"
        for piece in fake_output(params):
            if cancelled() or generated >= prepared.max_tokens:
                reason = "length"
                break
            if BOOM_GENERATE in prepared.text and generated == 1:
                raise RuntimeError(SECRET)
            generated += 1
            lps: tuple[TokenLogprob, ...] = ()
            if params.logprobs:
                top = tuple(
                    TopLogprob(w, -float(k + 1), tuple(w.encode())) for k, w in enumerate(WORDS[: params.top_logprobs])
                )
                lps = (TokenLogprob(piece, -0.5, tuple(piece.encode()), top),)
            text, stopped = scanner.feed(piece)
            if text or lps:
                yield TextDelta(text, lps)
            if stopped:
                break
        if not scanner.stopped:
            tail = scanner.flush()
            if tail:
                yield TextDelta(tail)
        yield Finish(reason)
        yield Usage(len(prepared.tokens), generated)

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    name = "fake"
    formats = ("fake",)

    def __init__(self) -> None:
        self.model = FakeModel()
        self.loads = 0

    def unavailable_reason(self) -> str | None:
        return None

    def load(self, model: ModelInfo, settings: Settings) -> FakeModel:
        self.loads += 1
        return self.model


class FakeSource:
    name = "fake"

    def discover(self) -> DiscoveryResult:
        info = ModelInfo(id=MODEL, format="fake", path="/nonexistent/fake", source="fake", context_length=CONTEXT)
        return DiscoveryResult(models=[info])


class FakePlugin:
    """Registers :class:`FakeSource` and :class:`FakeBackend`."""

    def __init__(self) -> None:
        self.backend = FakeBackend()

    @hookimpl
    def shimmy_register_sources(self, register, settings):
        register(FakeSource())

    @hookimpl
    def shimmy_register_backends(self, register):
        register(self.backend)


# ------------------------------------------------------------------ fixtures
@dataclass
class Harness:
    client: falcon.testing.TestClient
    plugin: FakePlugin
    settings: Settings
    validate: Callable[[dict, str], None]

    @property
    def model(self) -> FakeModel:
        return self.plugin.backend.model

    def post(self, path: str, body=None, raw: bytes | None = None, **kwargs) -> falcon.testing.Result:
        if raw is not None:
            return self.client.simulate_post(
                path, body=raw, headers={"Content-Type": "application/json"}, **kwargs
            )
        return self.client.simulate_post(path, json=body, **kwargs)

    def chat(self, **body) -> falcon.testing.Result:
        body.setdefault("model", MODEL)
        body.setdefault("messages", HI)
        return self.post("/v1/chat/completions", body)

    def completion(self, **body) -> falcon.testing.Result:
        body.setdefault("model", MODEL)
        body.setdefault("prompt", "Once upon a time")
        return self.post("/v1/completions", body)


@pytest.fixture(autouse=True)
def plugin_env(monkeypatch):
    """No SHIMMY_* plugin variable from the caller's shell changes what loads."""
    for var in PLUGIN_ENV:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def make_api(validate):
    """``make_api(**settings)``: a TestClient over the app with the fake plugin only."""
    made: list = []

    def make(model: FakeModel | None = None, dialects: tuple[str, ...] = ("openai", "openai_responses"),
             **overrides) -> Harness:
        """``model``: the fake backend's model, when a test needs another kind of fake; ``dialects``:
        the built-in dialect plugins to load."""
        settings = Settings.load({"demo": False}, {}).replace(**overrides)
        plugin = FakePlugin()
        if model is not None:
            plugin.backend.model = model
        pm = create_plugin_manager(load_entry_points=False, extra_plugins=[
            ("fake", plugin), *(builtin(name) for name in dialects)])
        shimmy = build(settings, pm)
        made.append(shimmy)
        # Falcon's simulated requests say Host: falconframework.org, which the DNS-rebinding check refuses.
        client = falcon.testing.TestClient(create_app(shimmy), headers={"Host": "localhost"})
        return Harness(client, plugin, settings, validate)

    yield make
    for shimmy in made:
        shimmy.close()


@pytest.fixture
def api(make_api) -> Harness:
    return make_api()


def sse_events(result: falcon.testing.Result) -> list[dict]:
    """Parse an SSE body, checking the framing: every event ``data: {json}\\n\\n``, ``[DONE]`` last and once."""
    assert result.status_code == 200, result.text
    assert result.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in {k.lower() for k in result.headers}
    text = result.text
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    events: list = []
    for block in blocks[:-1]:
        assert block.startswith("data: "), block
        assert "\n" not in block, block  # one line per event
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    assert all(isinstance(e, dict) for e in events[:-1])
    return events[:-1]


def assert_error(result: falcon.testing.Result, validate, status: int, *, param=..., code=..., type=None) -> dict:
    """The response is an OpenAI error with this status (and param/code when given)."""
    assert result.status_code == status, (result.status_code, result.text)
    assert result.headers["content-type"].startswith("application/json")
    body = result.json
    validate(body, "ErrorResponse")
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if type is not None:
        assert error["type"] == type, error
    if param is not ...:
        assert error["param"] == param, error
    if code is not ...:
        assert error["code"] == code, error
    assert "Traceback" not in result.text
    return error


# ------------------------------------------------------------------ models and health
def test_health(api):
    r = api.client.simulate_get("/health")
    assert r.status_code == 200
    assert r.json["status"] == "ok" and r.json["models"] == []
    api.chat(max_tokens=1)
    assert [m["path"] for m in api.client.simulate_get("/health").json["models"]] == ["/nonexistent/fake"]


def test_list_and_retrieve_models(api):
    r = api.client.simulate_get("/v1/models")
    assert r.status_code == 200
    api.validate(r.json, "ListModelsResponse")
    assert r.json["object"] == "list"
    [entry] = r.json["data"]
    assert entry["id"] == MODEL and entry["object"] == "model"
    assert entry["context_window"] == CONTEXT
    assert entry["format"] == "fake" and entry["source"] == "fake"
    for extra in ("architecture", "quantization", "parameters", "size_bytes"):
        assert extra in entry
    one = api.client.simulate_get(f"/v1/models/{MODEL}")
    assert one.status_code == 200
    api.validate(one.json, "Model")
    assert one.json == entry
    assert api.client.simulate_get("/v1/models/").json == r.json  # trailing slash


@pytest.mark.parametrize("model_id", ["no-such-model", "../../etc/passwd", "/etc/passwd", "/nonexistent/fake",
                                      "fake/../fake", "C:\\models\\fake.gguf", "fake\u0000"])
def test_unknown_or_path_like_model_is_404(api, model_id):
    for r in (api.chat(model=model_id), api.completion(model=model_id), api.chat(model=model_id, stream=True)):
        error = assert_error(r, api.validate, 404, param="model", code="model_not_found")
        assert error["type"] == "invalid_request_error"
    assert api.model.prepared == []  # nothing was loaded or prepared for an unknown model


@pytest.mark.parametrize("model_id", ["no-such-model", "etc/passwd", "nonexistent/fake"])
def test_retrieve_unknown_model_is_404(api, model_id):
    r = api.client.simulate_get(f"/v1/models/{model_id}")
    assert_error(r, api.validate, 404, param="model", code="model_not_found")


# ------------------------------------------------------------------ chat and completions
def test_chat_basic(api):
    r = api.chat(max_tokens=3)
    assert r.status_code == 200, r.text
    body = r.json
    api.validate(body, "CreateChatCompletionResponse")
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": "alpha beta gamma", "refusal": None}
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    usage = body["usage"]
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_natural_stop(api):
    body = api.chat().json
    assert body["choices"][0]["message"]["content"] == " ".join(WORDS)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(WORDS)


def test_openai_defaults_reach_the_backend(api):
    api.chat()
    _, params = api.model.generated[-1]
    assert params == SamplingParams()
    assert (params.temperature, params.top_p, params.presence_penalty, params.frequency_penalty) == (1, 1, 0, 0)
    assert params.max_tokens is None and params.seed is None and params.stop == ()


def test_parameters_reach_the_backend(api):
    r = api.chat(
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
        temperature=0.5, top_p=0.9, presence_penalty=-1, frequency_penalty=1.5, seed=7, stop="zz",
        logit_bias={"42": -100, "7": 3.5}, max_completion_tokens=5, logprobs=True, top_logprobs=2,
        user="someone", mystery_field={"ignored": True},
    )
    assert r.status_code == 200, r.text
    request = api.model.prepared[-1]
    assert request.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"})
    params = request.params
    assert (params.temperature, params.top_p) == (0.5, 0.9)
    assert (params.presence_penalty, params.frequency_penalty) == (-1.0, 1.5)
    assert params.seed == 7 and params.stop == ("zz",) and params.max_tokens == 5
    assert params.logit_bias == ((7, 3.5), (42, -100.0))
    assert params.logprobs is True and params.top_logprobs == 2


def test_max_completion_tokens_wins_over_max_tokens(api):
    api.chat(max_tokens=7, max_completion_tokens=2)
    assert api.model.prepared[-1].params.max_tokens == 2


def test_chat_logprobs(api):
    body = api.chat(max_tokens=2, logprobs=True, top_logprobs=3).json
    api.validate(body, "CreateChatCompletionResponse")
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["alpha", " beta"]
    assert all(len(c["top_logprobs"]) == 3 for c in content)
    assert content[1]["bytes"] == list(b" beta")


def test_chat_stop_string(api):
    body = api.chat(stop=["a gam", "zeta"]).json
    assert body["choices"][0]["message"]["content"] == "alpha bet"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_seed_is_reproducible_and_changes_output(api):
    a = api.chat(seed=3).json["choices"][0]["message"]["content"]
    b = api.chat(seed=3).json["choices"][0]["message"]["content"]
    c = api.chat(seed=4).json["choices"][0]["message"]["content"]
    assert a == b != c


def test_n_choices_have_indices_and_run_in_turn(api):
    body = api.chat(n=3, max_tokens=2, seed=1).json
    api.validate(body, "CreateChatCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in body["choices"]]
    assert texts == ["beta gamma", "gamma delta", "delta epsilon"]  # seed, seed+1, seed+2
    assert [p.seed for _, p in api.model.generated] == [1, 2, 3]
    assert len(api.model.prepared) == 1  # one prompt, prepared once
    assert body["usage"]["completion_tokens"] == 6


def test_n_without_seed_gives_identical_deterministic_choices(api):
    body = api.chat(n=2, max_tokens=1).json
    assert [c["message"]["content"] for c in body["choices"]] == ["alpha", "alpha"]


def test_completion_basic(api):
    r = api.completion(max_tokens=2)
    assert r.status_code == 200, r.text
    body = r.json
    api.validate(body, "CreateCompletionResponse")
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "alpha beta", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"]["prompt_tokens"] == 4


def test_completion_list_prompt_and_n(api):
    body = api.completion(prompt=["one two", "three", ""], n=2, max_tokens=1).json
    api.validate(body, "CreateCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3, 4, 5]
    assert [c["text"] for c in body["choices"]] == ["alpha"] * 6
    assert [r.prompt for r in api.model.prepared] == ["one two", "three", ""]
    assert body["usage"]["completion_tokens"] == 6


def test_usage_counts_each_prompt_once_with_n(api):
    single = api.completion(prompt=["one two", "three"], max_tokens=1).json["usage"]
    double = api.completion(prompt=["one two", "three"], n=2, max_tokens=1).json["usage"]
    assert single["prompt_tokens"] == 3
    assert double["prompt_tokens"] == 3 and double["completion_tokens"] == 4


def test_completion_echo(api):
    body = api.completion(prompt="Hello there", echo=True, max_tokens=2).json
    api.validate(body, "CreateCompletionResponse")
    assert body["choices"][0]["text"] == "Hello therealpha beta"
    plain = api.completion(prompt="Hello there", echo=False, max_tokens=2).json
    assert plain["choices"][0]["text"] == "alpha beta"


def test_completion_logprobs(api):
    body = api.completion(max_tokens=3, logprobs=2).json
    api.validate(body, "CreateCompletionResponse")
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["alpha", " beta", " gamma"]
    assert lp["text_offset"] == [0, 5, 10]
    assert len(lp["token_logprobs"]) == 3 and all(len(t) == 2 for t in lp["top_logprobs"])
    zero = api.completion(max_tokens=1, logprobs=0).json["choices"][0]["logprobs"]
    assert zero["tokens"] == ["alpha"] and zero["top_logprobs"] == [{}]


def test_completion_echo_with_logprobs_offsets_follow_the_echo(api):
    """text_offset indexes into the returned text, which starts with the echoed prompt."""
    streamed = sse_events(api.completion(prompt="Hi", echo=True, max_tokens=2, logprobs=0, stream=True))
    offsets = [o for e in streamed for c in e["choices"] if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert offsets == [2, 7]
    whole = api.completion(prompt="Hi", echo=True, max_tokens=2, logprobs=0).json["choices"][0]
    assert whole["text"] == "Hialpha beta"
    assert [whole["text"][o:] for o in whole["logprobs"]["text_offset"]] == ["alpha beta", " beta"]


def test_deadline_ends_generation_with_length(make_api):
    api = make_api(request_timeout=-1.0)
    body = api.chat().json
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == ""


def test_vanished_client_stops_generation(api):
    """A client gone (waitress's ``client_disconnected``) starts no generation at all."""
    r = api.client.simulate_post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "n": 3},
                                 extras={"waitress.client_disconnected": lambda: True})
    assert r.status_code == 200
    assert api.model.generated == []
    assert [c["finish_reason"] for c in r.json["choices"]] == ["length"] * 3


# ------------------------------------------------------------------ parameter validation
COMMON_BAD = [
    ({"model": 5}, "model"),
    ({"model": ""}, "model"),
    ({"model": None}, "model"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10**12}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": 10**12}, "max_completion_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.01}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"top_p": [1]}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": -3}, "n"),
    ({"n": 129}, "n"),
    ({"n": 17}, "n"),  # above the server's max_n (16)
    ({"n": "2"}, "n"),
    ({"n": 1.5}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": "usage"}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"stop": 5}, "stop"),
    ({"stop": {"a": 1}}, "stop"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": "a\u0000b"}, "stop"),
    ({"stop": ["ok", "\ud800"]}, "stop"),
    ({"seed": "1"}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"presence_penalty": "x"}, "presence_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": {}}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"12345678901": 1}}, "logit_bias"),
    ({"logit_bias": {"42": 101}}, "logit_bias.42"),
    ({"logit_bias": {"42": -100.5}}, "logit_bias.42"),
    ({"logit_bias": {"42": "high"}}, "logit_bias.42"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ({"user": 5}, "user"),
]

CHAT_BAD = COMMON_BAD + [
    ({"messages": None}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "a\u0000b"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "x \udc00"}]},
     "messages[1].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a\u0000"}]}]},
     "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio"}]}]},
     "messages[0].content[1]"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
]

COMPLETION_BAD = COMMON_BAD + [
    ({"prompt": None}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt[0]"),
    ({"prompt": ["x"] * 129}, "prompt"),
    ({"prompt": "a\u0000b"}, "prompt"),
    ({"prompt": "\ud800"}, "prompt"),
    ({"prompt": ["fine", "\udfff"]}, "prompt"),
    ({"echo": "yes"}, "echo"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"suffix": 5}, "suffix"),
    ({"best_of": 2}, "best_of"),
]


def _bad_id(case) -> str:
    text = json.dumps(case[0], ensure_ascii=True)
    return text if len(text) < 60 else text[:57] + "..."


def _raw(body: dict) -> bytes:
    """JSON bytes that keep lone surrogates as ``\\udXXX`` escapes (as a client would send them)."""
    return json.dumps(body, ensure_ascii=True).encode("ascii")


@pytest.mark.parametrize("extra,param", CHAT_BAD, ids=[_bad_id(c) for c in CHAT_BAD])
def test_bad_chat_parameter_is_400(api, extra, param):
    body = {"model": MODEL, "messages": HI, **extra}
    r = api.post("/v1/chat/completions", raw=_raw(body))
    assert_error(r, api.validate, 400, param=param, type="invalid_request_error")
    assert api.model.generated == []


@pytest.mark.parametrize("extra,param", COMPLETION_BAD, ids=[_bad_id(c) for c in COMPLETION_BAD])
def test_bad_completion_parameter_is_400(api, extra, param):
    body = {"model": MODEL, "prompt": "hi", **extra}
    r = api.post("/v1/completions", raw=_raw(body))
    assert_error(r, api.validate, 400, param=param, type="invalid_request_error")
    assert api.model.generated == []


@pytest.mark.parametrize("path,missing", [("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")])
def test_missing_required_parameters(api, path, missing):
    assert_error(api.post(path, {"model": MODEL}), api.validate, 400, param=missing)
    assert_error(api.post(path, {missing: HI if missing == "messages" else "x"}), api.validate, 400, param="model")


def test_bad_parameter_message_names_the_parameter(api):
    error = api.chat(temperature=3).json["error"]
    assert "temperature" in error["message"]
    error = api.chat(n=17).json["error"]
    assert "16" in error["message"] and error["code"] == "invalid_value"


@pytest.mark.parametrize("extra", [
    {"temperature": 0}, {"temperature": 2}, {"top_p": 0}, {"top_p": 1}, {"n": 16}, {"max_tokens": 1},
    {"presence_penalty": -2}, {"frequency_penalty": 2}, {"logit_bias": {"0": -100, "9999999999": 100}},
    {"stop": ["x"] * 16}, {"stop": None}, {"stop": []}, {"stop": ""}, {"seed": -(2**63)}, {"seed": 2**64 - 1},
    {"logprobs": True, "top_logprobs": 0}, {"logprobs": True, "top_logprobs": 20}, {"stream": False},
    {"stream": None}, {"stream_options": None}, {"temperature": None}, {"n": None}, {"max_tokens": None},
    {"messages": [{"role": "assistant", "content": None}, {"role": "user", "content": "x"}]},
    {"messages": [{"role": "user", "content": []}]},
])
def test_edge_values_are_accepted(api, extra):
    r = api.chat(**extra)
    assert r.status_code == 200, r.text
    api.validate(r.json, "CreateChatCompletionResponse")


# ------------------------------------------------------------------ hostile bodies
HOSTILE = {
    "empty": b"",
    "not-json": b"not json",
    "truncated": b'{"model": "fake", "messages": [',
    "array": b"[1, 2, 3]",
    "string": b'"hello"',
    "number": b"42",
    "null": b"null",
    "invalid-utf8": b'{"model": "fake", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
    "latin1": "{\"model\": \"fake\", \"prompt\": \"caf\u00e9\"}".encode("latin-1"),
    "nan": b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    "infinity": b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
    "-infinity": b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": -Infinity}',
    "nan-in-bias": b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": NaN}}',
    "nested-100k-objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "nested-100k-arrays": b'{"model": "fake", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "nested-100-objects": b'{"a":' * 100 + b"1" + b"}" * 100,
    "nested-100-arrays": b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "x": '
                         + b"[" * 100 + b"]" * 100 + b"}",
}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_body_is_400(api, path, name):
    r = api.post(path, raw=HOSTILE[name])
    assert_error(r, api.validate, 400, type="invalid_request_error")
    assert api.model.prepared == []


@pytest.mark.parametrize("name,value", [("temperature", b"1e400"), ("top_p", b"-1e400"), ("seed", b"1e400"),
                                        ("max_tokens", b"1e400"), ("n", b"2.5")])
def test_overflowing_or_float_numbers_are_400(api, name, value):
    raw = b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (name.encode(), value)
    assert_error(api.post("/v1/chat/completions", raw=raw), api.validate, 400, param=name)


@pytest.mark.parametrize("kind,extra", [
    ("chat", {"n": 2.0}), ("chat", {"max_tokens": 3.0}), ("chat", {"max_completion_tokens": 3.0}),
    ("chat", {"seed": 3.0}), ("chat", {"logprobs": True, "top_logprobs": 2.0}),
    ("completion", {"logprobs": 2.0}), ("completion", {"n": 2.0}),
])
def test_integral_floats_count_as_integers(api, kind, extra):
    r = api.chat(**extra) if kind == "chat" else api.completion(**extra)
    assert r.status_code == 200, r.text
    params = api.model.prepared[-1].params
    for value in (params.max_tokens, params.seed, params.top_logprobs):
        assert value is None or type(value) is int
    assert len(r.json["choices"]) == int(extra.get("n", 1))


@pytest.mark.parametrize("field", ["name", "tool_call_id"])
@pytest.mark.parametrize("value", ["\\ud800", "a\\u0000b"])
def test_bad_text_in_message_name_is_400(api, field, value):
    raw = ('{"model": "fake", "messages": [{"role": "user", "content": "x", "%s": "%s"}]}' % (field, value)).encode()
    assert_error(api.post("/v1/chat/completions", raw=raw), api.validate, 400, param=f"messages[0].{field}")
    assert api.model.prepared == []


def test_nan_is_refused_as_invalid_json(api):
    error = api.post("/v1/chat/completions", raw=HOSTILE["nan"]).json["error"]
    assert error["code"] == "invalid_json" and "NaN" in error["message"]


def test_nesting_within_the_limit_is_fine(api):
    raw = b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 50 + b"]" * 50 + b"}"
    assert api.post("/v1/chat/completions", raw=raw).status_code == 200


def test_escaped_unicode_that_is_valid_passes(api):
    raw = b'{"model": "fake", "prompt": "caf\\u00e9 \\ud83d\\ude00", "max_tokens": 1, "echo": true}'
    r = api.post("/v1/completions", raw=raw)
    assert r.status_code == 200, r.text
    assert r.json["choices"][0]["text"].startswith("caf\u00e9 \U0001F600")


# ------------------------------------------------------------------ routes, methods, sizes
def test_unknown_route_is_404(api):
    for path in ("/nope", "/v1/nope", "/v1/chat", "/v2/chat/completions"):
        assert_error(api.client.simulate_get(path), api.validate, 404)
        assert_error(api.client.simulate_post(path, json={}), api.validate, 404)


@pytest.mark.parametrize("method,path,allowed", [
    ("GET", "/v1/chat/completions", {"POST"}),
    ("PUT", "/v1/completions", {"POST"}),
    ("DELETE", "/v1/chat/completions", {"POST"}),
    ("POST", "/v1/models", {"GET"}),
    ("DELETE", "/v1/models/fake", {"GET"}),
    ("POST", "/health", {"GET"}),
])
def test_wrong_method_is_405_with_allow(api, method, path, allowed):
    r = api.client.simulate_request(method, path)
    assert_error(r, api.validate, 405)
    allow = {m.strip() for m in r.headers["allow"].split(",")}
    assert allowed <= allow and method not in allow


def test_body_over_limit_is_413(make_api):
    api = make_api(max_body_bytes=200)
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 300}]}
    assert_error(api.post("/v1/chat/completions", big), api.validate, 413, code="request_too_large")
    assert_error(api.post("/v1/completions", {"model": MODEL, "prompt": "y" * 300}), api.validate, 413)
    assert api.post("/v1/chat/completions", {"model": MODEL, "messages": HI}).status_code == 200


# ------------------------------------------------------------------ server-side errors
def test_context_length_exceeded(api):
    long = " ".join(["w"] * (CONTEXT + 1))
    error = assert_error(api.chat(messages=[{"role": "user", "content": long}]), api.validate, 400,
                         code="context_length_exceeded", type="invalid_request_error")
    assert error["param"] == "messages"
    error = assert_error(api.completion(prompt="a b c", max_tokens=CONTEXT), api.validate, 400,
                         code="context_length_exceeded")
    assert error["param"] == "max_tokens"


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": " ".join(["w"] * 100)}]}),
    ("/v1/completions", {"prompt": " ".join(["w"] * 100)}),
    ("/v1/completions", {"prompt": ["short", " ".join(["w"] * 100)]}),  # the second prompt fails
])
def test_context_length_exceeded_when_streaming_sends_no_sse(api, path, body):
    r = api.post(path, {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}, **body})
    assert_error(r, api.validate, 400, code="context_length_exceeded")
    assert "data:" not in r.text
    assert api.model.generated == []


def test_backend_crash_in_prepare_is_500_without_traceback(api, caplog):
    for stream in (False, True):
        with caplog.at_level(logging.ERROR, logger="shimmy"):
            r = api.chat(messages=[{"role": "user", "content": BOOM_PREPARE}], stream=stream)
        assert_error(r, api.validate, 500, type="server_error", param=None, code="internal_error")
        assert SECRET not in r.text and "RuntimeError" not in r.text
        assert "data:" not in r.text
    assert SECRET in caplog.text  # the details go to the log, not to the client


def test_backend_crash_without_stream_is_500(api):
    r = api.completion(prompt=BOOM_GENERATE)
    assert_error(r, api.validate, 500, type="server_error")
    assert SECRET not in r.text


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_backend_crash_while_streaming_ends_with_error_event(api, kind):
    if kind == "chat":
        r = api.chat(messages=[{"role": "user", "content": BOOM_GENERATE}], stream=True)
    else:
        r = api.completion(prompt=BOOM_GENERATE, stream=True)
    events = sse_events(r)
    *chunks, last = events
    api.validate(last, "ErrorResponse")
    assert last["error"]["type"] == "server_error"
    assert SECRET not in r.text and "Traceback" not in r.text
    assert chunks and all("error" not in c for c in chunks)
    texts = [c["choices"][0].get("delta", {}).get("content") or c["choices"][0].get("text") for c in chunks]
    assert "alpha" in texts  # the first word made it out before the crash


# ------------------------------------------------------------------ streaming
def _finishes(events: list[dict]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for e in events:
        for c in e["choices"]:
            if c["finish_reason"] is not None:
                out.setdefault(c["index"], []).append(c["finish_reason"])
    return out


def test_chat_stream_framing(api):
    r = api.chat(stream=True, max_tokens=3)
    assert r.headers["cache-control"] == "no-cache"
    events = sse_events(r)
    for e in events:
        api.validate(e, "CreateChatCompletionStreamResponse")
        assert e["object"] == "chat.completion.chunk" and e["model"] == MODEL
        assert "usage" not in e
        assert len(e["choices"]) == 1
    assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("chatcmpl-")
    assert len({e["created"] for e in events}) == 1
    first = events[0]["choices"][0]
    assert first["delta"]["role"] == "assistant" and first["finish_reason"] is None
    assert all("role" not in e["choices"][0]["delta"] for e in events[1:])
    assert _finishes(events) == {0: ["length"]}
    assert events[-1]["choices"][0]["finish_reason"] == "length" and events[-1]["choices"][0]["delta"] == {}
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == "alpha beta gamma"


def test_chat_stream_equals_non_stream(api):
    for extra in ({}, {"stop": ["a gam"]}, {"seed": 5, "max_tokens": 4}, {"stop": "eta"}):
        whole = api.chat(**extra).json["choices"][0]
        events = sse_events(api.chat(stream=True, **extra))
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        assert text == whole["message"]["content"]
        assert _finishes(events) == {0: [whole["finish_reason"]]}


def test_chat_stream_usage_only_when_asked(api):
    events = sse_events(api.chat(stream=True, max_tokens=2, stream_options={"include_usage": True}))
    for e in events:
        api.validate(e, "CreateChatCompletionStreamResponse")
    *chunks, usage = events
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 2
    assert all(c["choices"] and c["usage"] is None for c in chunks)
    assert len({e["id"] for e in events}) == 1
    for options in (None, {"include_usage": False}, {}):
        extra = {} if options is None else {"stream_options": options}
        events = sse_events(api.chat(stream=True, max_tokens=2, **extra))
        assert all(e["choices"] and "usage" not in e for e in events)


def test_chat_stream_n_choices(api):
    events = sse_events(api.chat(stream=True, n=2, max_tokens=2, stream_options={"include_usage": True}))
    for e in events:
        api.validate(e, "CreateChatCompletionStreamResponse")
    roles = [c["index"] for e in events for c in e["choices"] if "role" in c["delta"]]
    assert roles == [0, 1]
    assert _finishes(events) == {0: ["length"], 1: ["length"]}
    for index in (0, 1):
        mine = [c for e in events for c in e["choices"] if c["index"] == index]
        assert "role" in mine[0]["delta"] and mine[-1]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


def test_chat_stream_logprobs(api):
    events = sse_events(api.chat(stream=True, max_tokens=2, logprobs=True, top_logprobs=1))
    for e in events:
        api.validate(e, "CreateChatCompletionStreamResponse")
    tokens = [lp["token"] for e in events for c in e["choices"] if c["logprobs"] for lp in c["logprobs"]["content"]]
    assert tokens == ["alpha", " beta"]


def test_completion_stream_framing(api, validate):
    events = sse_events(api.completion(prompt=["a", "b"], stream=True, max_tokens=2,
                                       stream_options={"include_usage": True}))
    *chunks, usage = events
    assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("cmpl-")
    for e in chunks:
        # The completions schema has no null usage: only the last chunk has the field.
        assert e["object"] == "text_completion" and len(e["choices"]) == 1 and "usage" not in e
        _validate_completion_chunk(e, validate)
    validate(usage, "CreateCompletionResponse")
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert _finishes(events) == {0: ["length"], 1: ["length"]}
    texts = {i: "".join(c["text"] for e in chunks for c in e["choices"] if c["index"] == i) for i in (0, 1)}
    assert texts == {0: "alpha beta", 1: "alpha beta"}
    plain = sse_events(api.completion(stream=True, max_tokens=2))
    assert all(e["choices"] and "usage" not in e for e in plain)


def test_completion_stream_echo(api):
    events = sse_events(api.completion(prompt="Hi", echo=True, stream=True, max_tokens=1))
    assert "".join(c["text"] for e in events for c in e["choices"]) == "Hialpha"


def _validate_completion_chunk(chunk: dict, validate) -> None:
    """Streamed completion chunks reuse CreateCompletionResponse, whose ``finish_reason`` the
    spec does not mark nullable although the API sends ``null`` until the last chunk."""
    relaxed = json.loads(json.dumps(chunk))
    for choice in relaxed["choices"]:
        if choice["finish_reason"] is None:
            choice["finish_reason"] = "stop"
    validate(relaxed, "CreateCompletionResponse")


# ------------------------------------------------------------------ StopScanner
def feed_all(scanner: StopScanner, pieces: list[str]) -> tuple[str, bool]:
    out, stopped = "", False
    for piece in pieces:
        text, stopped = scanner.feed(piece)
        out += text
        if stopped:
            break
    if not stopped:
        out += scanner.flush()
    return out, stopped


def test_stop_scanner_without_stops_passes_through():
    scanner = StopScanner([])
    assert scanner.feed("abc") == ("abc", False)
    assert scanner.flush() == ""
    assert StopScanner(["", ""]).feed("x") == ("x", False)  # empty stop strings are ignored


def test_stop_scanner_stop_in_one_piece():
    scanner = StopScanner(["END"])
    assert scanner.feed("hello END world") == ("hello ", True)
    assert scanner.stopped
    assert scanner.feed("more") == ("", True)  # nothing after a stop


def test_stop_scanner_stop_split_across_feeds():
    scanner = StopScanner(["</s>"])
    assert scanner.feed("hello <") == ("hello ", False)  # "<" is held back
    assert scanner.feed("/") == ("", False)
    assert scanner.feed("s") == ("", False)
    assert scanner.feed("> tail") == ("", True)
    assert feed_all(StopScanner(["STOP"]), list("abcSTOPdef")) == ("abc", True)


def test_stop_scanner_false_start_is_released():
    scanner = StopScanner(["</s>"])
    assert scanner.feed("a </") == ("a ", False)
    assert scanner.feed("b>") == ("</b>", False)
    assert scanner.flush() == ""


def test_stop_scanner_overlapping_prefixes():
    # "aab": after "aa" a stop may still start at either "a"
    assert feed_all(StopScanner(["aab"]), ["a", "a", "a", "b", "c"]) == ("a", True)
    assert feed_all(StopScanner(["abab"]), ["ab", "ab", "ab"]) == ("", True)
    assert feed_all(StopScanner(["abab"]), ["xab", "ac"]) == ("xabac", False)
    scanner = StopScanner(["abcd", "bcx"])
    assert scanner.feed("zabc") == ("z", False)  # "abc" could start either stop
    assert scanner.feed("x") == ("a", True)      # "bcx" matched, at index 1


def test_stop_scanner_several_stops_earliest_wins():
    assert StopScanner(["world", "lo w"]).feed("hello world") == ("hel", True)
    assert StopScanner(["b", "abc"]).feed("xabc") == ("x", True)  # "abc" starts first
    assert feed_all(StopScanner(["\n\n", "User:"]), ["Hi", "\n", "Us", "er:", " x"]) == ("Hi\n", True)


def test_stop_scanner_flush_returns_held_text():
    scanner = StopScanner(["STOP"])
    assert scanner.feed("abc ST") == ("abc ", False)
    assert scanner.held == "ST"
    assert scanner.flush() == "ST"
    assert scanner.flush() == ""
    assert scanner.feed("x") == ("x", False)


def test_stop_scanner_holds_only_what_could_start_a_stop():
    scanner = StopScanner(["xyz", "hello"])
    assert scanner.feed("say hel") == ("say ", False)
    assert scanner.feed("p") == ("help", False)
    assert scanner.feed(" x") == (" ", False)
    assert scanner.feed("yz!") == ("", True)


# ------------------------------------------------------------------ the docs match the code
def test_api_doc_lists_every_request_parameter():
    from pathlib import Path

    from shimmy_plugins.dialects.openai.openai_requests import CHAT_SCHEMA, COMPLETION_SCHEMA

    doc = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    for schema in (CHAT_SCHEMA, COMPLETION_SCHEMA):
        for name in schema["properties"]:
            assert f"`{name}`" in doc, f"docs/api.md does not document the parameter {name!r}"
    for name in ("context_window", "format", "architecture", "quantization", "parameters", "size_bytes",
                 "source", "model_not_found", "context_length_exceeded", "invalid_json", "request_too_large"):
        assert f"`{name}`" in doc, name


def test_configuration_doc_lists_every_flag_and_variable():
    from dataclasses import fields
    from pathlib import Path

    from shimmy_core.cli import _parser

    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    parser = _parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    for p in (parser, serve):
        for action in p._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert re.search(rf"{re.escape(flag)}(?![\w-])", doc), f"docs/configuration.md lacks {flag}"
    for f in fields(Settings):
        assert f"SHIMMY_{f.name.upper()}" in doc, f"docs/configuration.md does not document SHIMMY_{f.name.upper()}"
    for var in ("SHIMMY_MODEL_PATHS", *PLUGIN_ENV):
        assert var in doc, var


def test_models_say_whether_they_can_be_served(make_api, monkeypatch):
    """A model whose backend cannot run here (its extra is missing) is listed as unavailable,
    with the reason that names the fix; a request for it gets a 503 with that reason."""
    api = make_api()
    listed = api.client.simulate_get("/v1/models").json["data"][0]
    assert listed["available"] is True and listed["unavailable_reason"] is None
    monkeypatch.setattr(FakeBackend, "unavailable_reason", lambda self: "pip install 'fake-extra'")
    listed = api.client.simulate_get("/v1/models").json["data"][0]
    assert listed["available"] is False and listed["unavailable_reason"] == "pip install 'fake-extra'"
    api.validate(listed, "Model")
    r = api.chat()
    assert r.status_code == 503 and "pip install 'fake-extra'" in r.json["error"]["message"]


def test_the_cores_neutral_errors_leave_in_openai_shape(validate):
    """The service raises the contract's neutral errors; the OpenAI dialect maps them."""
    from shimmy_core.contract.generation import InvalidRequest, ModelNotFound
    from shimmy_plugins.dialects.openai.openai_errors import from_exception

    missing = from_exception(ModelNotFound("nope"))
    assert missing.status == 404 and missing.code == "model_not_found" and missing.param == "model"
    assert missing.message == "The model 'nope' does not exist. GET /v1/models lists the models this server has."
    bad = from_exception(InvalidRequest("Tools the server runs itself need 'n' to be 1.", "n"))
    assert bad.status == 400 and bad.type == "invalid_request_error" and bad.param == "n"
    for err in (missing, bad):
        validate(err.body(), "ErrorResponse")
