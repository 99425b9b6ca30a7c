"""Operations over Falcon's TestClient with the fake backend: API keys, CORS,
the Host check, request limits, /metrics, the request log, the drain of a
shutdown, and the model manager's unloading.  Real-server behaviour (signals,
slow clients) is in test_ops_server.py."""

from __future__ import annotations

import gc
import logging
import threading
import time

import falcon.testing
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shimmy_core.app import build, create_app
from shimmy_core.contract.generation import (
    Finish,
    GenerationRequest,
    Overloaded,
    PreparedPrompt,
    SamplingParams,
    TextDelta,
    Usage,
)
from shimmy_core.contract.hookspecs import hookimpl
from shimmy_core.lifecycle import ShuttingDown
from shimmy_core.catalog import ModelManager
from shimmy_core.contract.model_info import ModelInfo
from shimmy_core.plugin_manager import create_plugin_manager
from shimmy_core.plugin_registry import build_registry
from shimmy_core.http.server import server_connections, server_threads
from shimmy_core.contract.settings import Settings
from tests.conftest import builtin, wait_for
from tests.test_openai_api import HI, MODEL, FakePlugin, Harness, assert_error

CHAT = "/v1/chat/completions"


@pytest.fixture
def make_ops(validate, tmp_path):
    """``make_ops(**settings)``: a TestClient over the fake backend, and the Shimmy behind it."""
    made = []

    def make(**overrides):
        settings = Settings.load({"demo": False}, {}).replace(home=tmp_path, **overrides)
        plugin = FakePlugin()
        pm = create_plugin_manager(load_entry_points=False, extra_plugins=[("fake", plugin), builtin("openai")])
        shimmy = build(settings, pm)
        made.append(shimmy)
        client = falcon.testing.TestClient(create_app(shimmy), headers={"Host": "localhost"})
        return Harness(client, plugin, settings, validate), shimmy

    yield make
    for shimmy in made:
        shimmy.close()


def chat(api, headers=None, **body):
    return api.client.simulate_post(CHAT, json={"model": MODEL, "messages": HI, "max_tokens": 2, **body},
                                    headers=headers or {})


# ------------------------------------------------------------------ API keys
def test_api_key_accepted_and_refused(make_ops):
    api, _ = make_ops(api_key=("sk-one", "sk-two"))
    for headers in ({}, {"Authorization": "Bearer sk-three"}, {"Authorization": "sk-one"},
                    {"Authorization": "Basic c2stb25lOg=="}, {"Authorization": "Bearer "}):
        r = chat(api, headers)
        error = assert_error(r, api.validate, 401, code="invalid_api_key")
        assert "sk-" not in error["message"]
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert api.model.prepared == []  # refused before anything ran
    for key in ("sk-one", "sk-two"):
        assert chat(api, {"Authorization": f"Bearer {key}"}).status_code == 200
    assert chat(api, {"Authorization": "bearer  sk-two "}).status_code == 200
    assert api.client.simulate_get("/health").status_code == 200  # open
    assert api.client.simulate_get("/v1/models").status_code == 401
    assert api.client.simulate_get("/metrics").status_code == 401
    assert api.client.simulate_get("/metrics", headers={"Authorization": "Bearer sk-one"}).status_code == 200


def test_api_keys_from_the_environment_are_comma_separated_and_hidden_from_repr():
    settings = Settings.load({}, {"SHIMMY_API_KEY": "sk-a, sk-b"})
    assert settings.api_key == ("sk-a", "sk-b")
    assert "sk-a" not in repr(settings)
    assert Settings.load({"api_key": ["sk-flag"]}, {"SHIMMY_API_KEY": "sk-env"}).api_key == ("sk-flag",)


# ------------------------------------------------------------------ CORS
PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}


def test_cors_preflight_from_localhost_is_answered_without_credentials(make_ops):
    api, _ = make_ops(api_key=("sk-one",))
    r = api.client.simulate_options(CHAT, headers={"Origin": "http://localhost:3000", **PREFLIGHT,
                                                   "Access-Control-Request-Private-Network": "true"})
    assert r.status_code == 204, r.text  # no API key needed: browsers send none in a preflight
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == PREFLIGHT["Access-Control-Request-Headers"]
    assert r.headers["access-control-allow-private-network"] == "true"
    assert int(r.headers["access-control-max-age"]) > 0
    assert "Origin" in r.headers["vary"]
    assert "access-control-allow-credentials" not in r.headers
    for origin in ("http://127.0.0.1:8080", "https://[::1]", "http://app.localhost:5173"):
        assert api.client.simulate_options(CHAT, headers={"Origin": origin, **PREFLIGHT}).status_code == 204


def test_cors_refuses_other_origins_with_an_openai_error(make_ops):
    api, _ = make_ops()
    for origin in ("https://evil.example", "null", "http://localhost.evil.example", "file://"):
        r = api.client.simulate_options(CHAT, headers={"Origin": origin, **PREFLIGHT})
        assert_error(r, api.validate, 403, code="origin_not_allowed")
        assert "access-control-allow-origin" not in r.headers
    r = chat(api, {"Origin": "https://evil.example"}, temperature=0)
    assert_error(r, api.validate, 403, code="origin_not_allowed")
    assert api.model.prepared == []  # a page elsewhere cannot even make the model run


def test_a_page_may_call_the_server_it_came_from(make_ops):
    """The chat page at / served beyond loopback (--host 0.0.0.0, reached at 192.0.2.2:18081)
    calls the API from its own origin; a page from that host on another port may not."""
    api, _ = make_ops()
    own = {"Origin": "http://192.0.2.2:18081", "Host": "192.0.2.2:18081"}
    r = chat(api, own)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://192.0.2.2:18081"
    other = chat(api, {"Origin": "http://192.0.2.2:9999", "Host": "192.0.2.2:18081"})
    assert_error(other, api.validate, 403, code="origin_not_allowed")
    assert_error(chat(api, {"Origin": "https://192.0.2.2:18081", "Host": "192.0.2.2:18081"}), api.validate, 403,
                 code="origin_not_allowed")  # another scheme is another origin


def test_cors_allow_list_and_wildcard(make_ops):
    api, _ = make_ops(cors_origins=("https://app.example.com/",))
    r = chat(api, {"Origin": "https://app.example.com"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "X-Shimmy-Cache" in r.headers["access-control-expose-headers"]
    assert chat(api, {"Origin": "https://other.example.com"}).status_code == 403
    error = chat(api, {"Origin": "https://app.example.com"}, model="nope")
    assert error.status_code == 404 and error.headers["access-control-allow-origin"] == "https://app.example.com"

    anyone, _ = make_ops(cors_origins=("*",), api_key=("sk-one",))
    r = anyone.client.simulate_options(CHAT, headers={"Origin": "https://anywhere.example", **PREFLIGHT})
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers  # never '*' with credentials
    r = chat(anyone, {"Origin": "https://anywhere.example", "Authorization": "Bearer sk-one"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers


# ------------------------------------------------------------------ DNS rebinding
@pytest.mark.parametrize("host", ["localhost", "localhost:11435", "127.0.0.1:8080", "[::1]:11435", "10.1.2.3",
                                  "shimmy:11435", "app.localhost", "LOCALHOST."])
def test_local_host_names_are_answered(make_ops, host):
    api, _ = make_ops()
    assert api.client.simulate_get("/v1/models", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:11435", "127.0.0.1.nip.io", "localhost.evil.com"])
def test_foreign_host_names_are_refused(make_ops, host):
    api, _ = make_ops()
    for r in (api.client.simulate_get("/v1/models", headers={"Host": host}),
              api.client.simulate_post(CHAT, json={"model": MODEL, "messages": HI}, headers={"Host": host}),
              api.client.simulate_get("/health", headers={"Host": host})):
        error = assert_error(r, api.validate, 403, code="host_not_allowed")
        assert "--allowed-host" in error["message"]
    assert api.model.prepared == []


def test_allowed_host_admits_names(make_ops):
    api, _ = make_ops(allowed_hosts=("llm.example.com", ".corp.example"))
    for host in ("llm.example.com:443", "a.corp.example", "b.a.corp.example"):
        assert api.client.simulate_get("/v1/models", headers={"Host": host}).status_code == 200
    assert api.client.simulate_get("/v1/models", headers={"Host": "corp.example.org"}).status_code == 403
    anyone, _ = make_ops(allowed_hosts=("*",))
    assert anyone.client.simulate_get("/v1/models", headers={"Host": "evil.example"}).status_code == 200


# ------------------------------------------------------------------ limits
def test_body_message_count_prompt_tokens_and_header_limits(make_ops):
    api, _ = make_ops(max_body_bytes=2000, max_messages=3, max_prompt_tokens=12, max_header_bytes=4096)
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}]}
    assert_error(api.client.simulate_post(CHAT, json=big), api.validate, 413, code="request_too_large")
    many = [{"role": "user", "content": "hi"}] * 4
    assert_error(chat(api, messages=many), api.validate, 400, param="messages", code="too_many_messages")
    long = [{"role": "user", "content": "word " * 20}]
    assert_error(chat(api, messages=long), api.validate, 400, param="messages", code="prompt_too_long")
    r = api.client.simulate_post("/v1/completions", json={"model": MODEL, "prompt": "word " * 20})
    assert_error(r, api.validate, 400, param="prompt", code="prompt_too_long")
    assert api.model.generated == []
    r = chat(api, {"X-Padding": "p" * 5000})
    assert_error(r, api.validate, 431, code="headers_too_large")
    assert chat(api, messages=[{"role": "user", "content": "short"}] * 3).status_code == 200


def test_waitress_threads_and_connections_follow_the_admitted_concurrency():
    settings = Settings.load({"parallel": 8, "queue_size": 40}, {})
    assert server_threads(settings) >= 8 + 40
    assert server_connections(settings) > server_threads(settings)


# ------------------------------------------------------------------ metrics and the request log
def families(api, headers=None) -> dict:
    r = api.client.simulate_get("/metrics", headers=headers or {})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def sample(fams: dict, family: str, name: str | None = None, **labels) -> float:
    for s in fams[family].samples:
        if s.name == (name or family) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {name or family} {labels} in {fams[family].samples}")


def test_metrics_in_prometheus_text_format(make_ops, monkeypatch):
    api, shimmy = make_ops()
    monkeypatch.setattr(type(api.model), "stats", lambda self: {"busy_slots": 1, "queued": 2}, raising=False)
    chat(api, max_tokens=3)
    chat(api, stream=True, max_tokens=2)
    chat(api, model="nope")
    fams = families(api)
    assert sample(fams, "shimmy_requests", "shimmy_requests_total", route=CHAT, method="POST", status="200") == 2
    assert sample(fams, "shimmy_requests", "shimmy_requests_total", route=CHAT, status="404") == 1
    assert sample(fams, "shimmy_prompt_tokens", "shimmy_prompt_tokens_total", model=MODEL) > 0
    assert sample(fams, "shimmy_completion_tokens", "shimmy_completion_tokens_total", model=MODEL) == 5
    assert sample(fams, "shimmy_time_to_first_token_seconds", "shimmy_time_to_first_token_seconds_count",
                  model=MODEL) == 2
    assert sample(fams, "shimmy_request_duration_seconds", "shimmy_request_duration_seconds_count",
                  route=CHAT) == 3
    assert sample(fams, "shimmy_busy_slots", model=MODEL) == 1
    assert sample(fams, "shimmy_queue_depth", model=MODEL) == 2
    assert sample(fams, "shimmy_loaded_models") == 1
    assert sample(fams, "shimmy_cache_misses", "shimmy_cache_misses_total") == 2  # the 404 never got that far
    assert sample(fams, "shimmy_cache_hits", "shimmy_cache_hits_total") == 0


def test_one_log_line_per_request_without_prompts_by_default(make_ops, caplog):
    api, _ = make_ops()
    with caplog.at_level(logging.INFO, logger="shimmy.access"):
        r = chat(api, {"X-Request-Id": "req-42"}, messages=[{"role": "user", "content": "my secret plan"}])
        chat(api, stream=True)
    assert r.headers["x-request-id"] == "req-42"
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "shimmy.access"]
    assert len(lines) == 2
    assert lines[0].startswith(f"POST {CHAT} 200 model={MODEL} tokens=")
    assert "ms id=req-42" in lines[0] and "cache=miss" in lines[0]
    assert all("secret" not in line for line in lines)


def test_log_prompts_adds_the_prompt(make_ops, caplog):
    api, _ = make_ops(log_prompts=True)
    with caplog.at_level(logging.INFO, logger="shimmy.access"):
        chat(api, messages=[{"role": "user", "content": "my secret plan"}])
    [line] = [rec.getMessage() for rec in caplog.records if rec.name == "shimmy.access"]
    assert "my secret plan" in line


# ------------------------------------------------------------------ shutdown, in the app
def test_draining_answers_503_with_retry_after(make_ops):
    api, shimmy = make_ops()
    assert api.client.simulate_get("/health").status_code == 200
    shimmy.lifecycle.begin_drain()
    health = api.client.simulate_get("/health")
    assert health.status_code == 503 and health.json["status"] == "shutting_down"
    assert int(health.headers["retry-after"]) >= 1
    for r in (chat(api), api.client.simulate_get("/v1/models")):
        assert_error(r, api.validate, 503, code="shutting_down")
        assert int(r.headers["retry-after"]) >= 1
    assert api.client.simulate_get("/metrics").status_code == 200
    assert api.model.prepared == []


# ------------------------------------------------------------------ the model manager
class Loaded:
    context_length = 64

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log
        self.admit = threading.Event()

    def prepare(self, request):
        return PreparedPrompt(text="x", tokens=(1,) * 5, max_tokens=4)

    def generate(self, prepared, params, cancelled):
        yield TextDelta("x")
        yield Finish("stop")
        yield Usage(5, 1)

    def generate_choices(self, choices, cancelled):
        """Like the GGUF engine: wait for a slot, give up when cancelled while waiting."""
        while not self.admit.wait(0.01):
            if cancelled():
                break
        return iter(())

    def stats(self):
        return {"busy_slots": 0, "queued": 0}

    def close(self):
        self.log.append(("close", self.name))


class Counting:
    name = "counting"
    formats = ("fake",)

    def __init__(self):
        self.log: list = []

    def unavailable_reason(self):
        return None

    def load(self, model, settings):
        self.log.append(("load", model.id))
        return Loaded(model.id, self.log)


def manager(backend: Counting | None = None, devices=None, **overrides) -> tuple[ModelManager, Counting]:
    """A manager over one backend (a fresh ``Counting`` by default); ``devices`` as ModelManager takes it."""
    backend = backend or Counting()

    class Plugin:
        @hookimpl
        def shimmy_register_backends(self, register):
            register(backend)

    pm = create_plugin_manager(load_entry_points=False, extra_plugins=[("counting", Plugin())])
    settings = Settings.load({"demo": False}, {}).replace(**overrides)
    from shimmy_core.lifecycle import Lifecycle

    return ModelManager(pm, build_registry(pm, settings), settings, Lifecycle(1.0), devices=devices), backend


def info(name: str) -> ModelInfo:
    return ModelInfo(id=name, path=f"/models/{name}", format="fake", source="test")


def test_max_loaded_models_unloads_the_least_recently_used_idle_model():
    mgr, backend = manager(max_loaded_models=2)
    a = mgr.get(info("a"))
    del a
    b = mgr.get(info("b"))  # held: in use
    mgr.get(info("a"))      # a is now more recent than b, but b is busy
    gc.collect()
    mgr.get(info("c"))      # unloads a (idle), never b
    assert ("close", "a") in backend.log and ("close", "b") not in backend.log
    assert sorted(mgr.loaded_paths()) == ["/models/b", "/models/c"]
    held_c = mgr.get(info("c"))
    with pytest.raises(Overloaded):
        mgr.get(info("d"))  # both loaded models are busy
    assert sorted(mgr.loaded_paths()) == ["/models/b", "/models/c"]
    del b, held_c
    gc.collect()
    mgr.get(info("d"))
    assert len(mgr.loaded_paths()) == 2
    mgr.close()


def test_keep_alive_unloads_idle_models_but_never_one_in_use():
    mgr, backend = manager(keep_alive=0.05)
    held = mgr.get(info("a"))
    mgr.get(info("b"))
    gc.collect()
    assert wait_for(lambda: ("close", "b") in backend.log)
    time.sleep(0.2)
    assert ("close", "a") not in backend.log and mgr.loaded_paths() == ["/models/a"]
    assert [e["id"] for e in mgr.stats()] == ["a"]
    del held
    gc.collect()
    assert wait_for(lambda: mgr.loaded_paths() == [])
    assert mgr.get(info("a")) is not None and backend.log.count(("load", "a")) == 2  # loads again
    mgr.close()


def test_keep_alive_zero_unloads_when_the_last_request_ends():
    mgr, backend = manager(keep_alive=0)
    lease = mgr.get(info("a"))
    lease.prepare(GenerationRequest(prompt="x"))
    del lease
    gc.collect()
    assert wait_for(lambda: ("close", "a") in backend.log)


def test_a_request_waiting_for_a_slot_gets_503_when_the_server_drains():
    mgr, _ = manager()
    lease = mgr.get(info("a"))
    outcome: dict = {}

    def wait():
        try:
            lease.generate_choices([(None, SamplingParams())], lambda: False)
            outcome["r"] = "admitted"
        except ShuttingDown as exc:
            outcome["r"] = exc

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)
    mgr._lifecycle.begin_drain()
    waiter.join(timeout=20)
    assert isinstance(outcome["r"], ShuttingDown) and outcome["r"].code == "shutting_down"
    with pytest.raises(ShuttingDown):  # and so does any request that starts now
        lease.generate_choices([(None, SamplingParams())], lambda: False)
    mgr.close()


def test_a_lease_forwards_everything_but_close():
    mgr, backend = manager()
    lease = mgr.get(info("a"))
    assert lease.name == "a" and lease.context_length == 64 and lease.stats() == {"busy_slots": 0, "queued": 0}
    lease.close()
    assert ("close", "a") not in backend.log
    mgr.close()
    assert ("close", "a") in backend.log


class NoChoices:
    """A backend without generate_choices: the lease must not invent one."""

    name = "plain"
    formats = ("plain",)

    def unavailable_reason(self):
        return None

    def load(self, model, settings):
        return type("M", (), {"context_length": 8, "close": lambda self: None, "generate": lambda *a: iter(())})()


def test_a_lease_has_generate_choices_only_when_the_model_has():
    class Plugin:
        @hookimpl
        def shimmy_register_backends(self, register):
            register(NoChoices())

    pm = create_plugin_manager(load_entry_points=False, extra_plugins=[("plain", Plugin())])
    settings = Settings.load({"demo": False}, {})
    mgr = ModelManager(pm, build_registry(pm, settings), settings)
    lease = mgr.get(ModelInfo(id="p", path="/p", format="plain", source="t"))
    assert getattr(lease, "generate_choices", None) is None
    mgr.close()

