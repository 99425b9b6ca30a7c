"""Server-wide sampling defaults: ``shimmy serve --temp/--top-p/--top-k/--min-p`` (llama-server's
flags) apply to every request that leaves the value out, in every dialect; a request's own value wins."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from shimmy_core.contract.settings import Settings
from shimmy_plugins.dialects.anthropic.anthropic_requests import parse_request as anthropic_request
from shimmy_plugins.dialects.ollama.ollama_requests import sampling as ollama_sampling
from shimmy_plugins.dialects.openai.openai_requests import parse_request as openai_request
from shimmy_plugins.dialects.openai.responses_requests import parse_responses_request
from tests.conftest import sdk_client, serve_model

MODEL = "SmolLM2-135M-Instruct.Q4_1"
DEFAULTS = {"temperature": 0.25, "top_p": 0.5, "top_k": 7, "min_p": 0.05}


def test_settings_name_only_the_defaults_that_were_given():
    assert Settings.load({}, environ={}).sampling_defaults() == {}
    settings = Settings.load({"temperature": 0.0, "top_k": 7}, environ={"SHIMMY_MIN_P": "0.1"})
    assert settings.sampling_defaults() == {"temperature": 0.0, "top_k": 7, "min_p": 0.1}


def test_every_dialect_samples_with_the_defaults_when_the_request_sets_none():
    chat = openai_request("chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 4, DEFAULTS)
    responses = parse_responses_request({"model": MODEL, "input": "hi"}, [], defaults=DEFAULTS)
    anthropic = anthropic_request({"model": MODEL, "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]},
                                  64, defaults=DEFAULTS)
    for params in (chat.prompts[0].params, responses.parsed.prompts[0].params, anthropic.prompts[0].params,
                   ollama_sampling(None, None, None, DEFAULTS)):
        assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.25, 0.5, 7, 0.05)


def test_a_request_value_wins_over_the_default():
    chat = openai_request("chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                   "temperature": 1.5, "top_k": 0}, 4, DEFAULTS)
    assert (chat.prompts[0].params.temperature, chat.prompts[0].params.top_k) == (1.5, 0)
    ollama = ollama_sampling({"temperature": 0.9}, None, None, DEFAULTS)
    assert (ollama.temperature, ollama.top_p) == (0.9, 0.5)


def test_without_defaults_each_api_keeps_its_own():
    chat = openai_request("chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 4)
    assert (chat.prompts[0].params.temperature, chat.prompts[0].params.top_p) == (1.0, 1.0)
    ollama = ollama_sampling(None, None, None)
    assert (ollama.temperature, ollama.top_k, ollama.top_p) == (0.8, 40, 0.9)  # Ollama's documented defaults


@pytest.mark.parametrize("flag", [["--temp", "2.5"], ["--top-p", "1.5"], ["--top-k", "-1"], ["--min-p", "nan"]])
def test_an_out_of_range_default_is_refused_at_start(flag):
    done = subprocess.run([sys.executable, "-m", "shimmy_core", "serve", *flag], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and flag[0] in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def greedy_server(start_server, smollm2_path):
    return serve_model(start_server, smollm2_path, "--temp", "0", "--top-p", "0.5")


def test_the_server_default_reaches_the_wire(greedy_server):
    """The Responses API echoes the sampling it used; a request that sets none gets the server's."""
    client = sdk_client(greedy_server)
    used = client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=4)
    assert (used.temperature, used.top_p) == (0.0, 0.5)
    own = client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=4, temperature=0.7)
    assert (own.temperature, own.top_p) == (0.7, 0.5)


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 6}),
    ("/api/chat", {"messages": [{"role": "user", "content": "Name a tree."}], "stream": False,
                   "options": {"num_predict": 6}}),
])
def test_a_greedy_server_default_makes_requests_cacheable(greedy_server, path, body):
    """With ``--temp 0`` a request that sets no temperature is deterministic, so the response cache
    answers its repeat (only greedy or seeded requests are cached)."""
    body = {"model": MODEL, **body}
    first = httpx.post(greedy_server.base + path, json=body, timeout=120)
    again = httpx.post(greedy_server.base + path, json=body, timeout=120)
    assert first.status_code == again.status_code == 200, first.text
    assert (first.headers["X-Shimmy-Cache"], again.headers["X-Shimmy-Cache"]) == ("miss", "hit")


def test_an_out_of_range_variable_is_refused_at_start(tmp_path):
    done = subprocess.run([sys.executable, "-m", "shimmy_core", "serve"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SHIMMY_TEMPERATURE": "7"})
    assert done.returncode != 0 and "SHIMMY_TEMPERATURE" in done.stderr and "Traceback" not in done.stderr
