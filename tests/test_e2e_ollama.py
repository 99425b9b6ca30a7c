"""The Ollama API end to end: the real ``ollama`` Python library against ``shimmy serve`` with
SmolLM2 (chat) and all-MiniLM-L6-v2 (embeddings): list, show, ps, chat (plain, streamed, with
tools, with a format schema), generate, embed, and Ollama's error shape."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import MODEL_ID, serve_model
from tests.test_e2e_embeddings import cosine, EMBED

ollama = pytest.importorskip("ollama")
FAST = {"temperature": 0, "num_predict": 8}
HI = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server(start_server, minilm_gguf_path, smollm2_path):
    return serve_model(start_server, minilm_gguf_path, "--model", str(smollm2_path))


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.base, timeout=120)


def test_list_show_and_version(server, client):
    names = {m.model for m in client.list().models}
    assert {MODEL_ID, EMBED} <= names
    chat = next(m for m in client.list().models if m.model == MODEL_ID)
    assert chat.details.format == "gguf" and chat.details.family == "llama" and chat.size > 0
    shown = client.show(MODEL_ID)
    assert "completion" in shown.capabilities and "tools" in shown.capabilities
    assert shown.details.quantization_level and shown.modelinfo["general.architecture"] == "llama"
    assert client.show(EMBED).capabilities == ["embedding"]
    assert httpx.get(server.base + "/api/version").json()["version"]


def test_chat_plain_and_streamed(client):
    reply = client.chat(model=MODEL_ID, messages=HI, options=FAST)
    assert reply.message.role == "assistant" and reply.message.content
    assert reply.done and reply.done_reason == "length" and reply.eval_count == 8
    assert reply.prompt_eval_count > 0 and reply.total_duration >= reply.eval_duration > 0
    pieces = list(client.chat(model=MODEL_ID, messages=HI, options=FAST, stream=True))
    assert [p.done for p in pieces][-1] is True and not any(p.done for p in pieces[:-1])
    assert "".join(p.message.content for p in pieces) == reply.message.content  # temperature 0: the same answer
    assert client.chat(model=f"{MODEL_ID}:latest", messages=HI, options=FAST).message.content  # the implied tag
    for think in (False, True):  # a model that does not think answers anyway, with no thinking
        answer = client.chat(model=MODEL_ID, messages=HI, options=FAST, think=think)
        assert answer.message.content and not answer.message.thinking


def test_chat_with_tools_and_a_format_schema(client):
    def get_weather(city: str) -> str:
        """Get the weather in a city.

        Args:
          city: The city's name
        """
        return "sunny"

    reply = client.chat(model=MODEL_ID, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                        tools=[get_weather], options={"temperature": 0, "num_predict": 48})
    assert reply.done
    for call in reply.message.tool_calls or ():
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    follow = client.chat(model=MODEL_ID, options=FAST, tools=[get_weather], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                          "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}])
    assert follow.done
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]}
    shaped = client.chat(model=MODEL_ID, messages=[{"role": "user", "content": "Name a fruit as JSON."}],
                         format=schema, options={"temperature": 0, "num_predict": 32})
    assert isinstance(json.loads(shaped.message.content)["name"], str)


def test_generate_embed_and_ps(client):
    made = client.generate(model=MODEL_ID, prompt="The capital of France is", options=FAST)
    assert made.response and made.done and made.eval_count == 8
    raw = client.generate(model=MODEL_ID, prompt="1, 2, 3,", raw=True, options=FAST)
    assert raw.response and raw.done_reason == "length"
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "Interest rates went up."]
    vectors = client.embed(model=EMBED, input=texts).embeddings
    assert len(vectors) == 3 and len(vectors[0]) == 384
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    legacy = client.embeddings(model=EMBED, prompt=texts[0]).embedding
    assert max(abs(a - b) for a, b in zip(legacy, vectors[0])) < 1e-5
    loaded = {m.model for m in client.ps().models}
    assert {MODEL_ID, EMBED} <= loaded


def test_errors(server, client):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="no-such-model", messages=HI)
    assert err.value.status_code == 404 and "not found" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model=MODEL_ID, input="hi")
    assert err.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("llama3")
    assert err.value.status_code == 501 and "ollama pull" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.delete(MODEL_ID)
    assert "shimmy remove" in err.value.error
    refused = httpx.post(server.base + "/api/chat", json={"model": MODEL_ID, "messages": HI, "stream": False,
                                                            "options": {"repeat_penalty": 1.2}})
    assert refused.status_code == 400 and set(refused.json()) == {"error"}


def test_keep_alive_zero_unloads(client):
    """Ollama's "unload now" (no prompt, keep_alive 0), and a request whose keep_alive 0 unloads
    its model as soon as it is answered."""
    import time

    def loaded() -> set[str]:
        return {m.model for m in client.ps().models}

    client.generate(model=MODEL_ID, prompt="", keep_alive="5m")  # load ahead of use
    assert MODEL_ID in loaded()
    assert client.generate(model=MODEL_ID, prompt="", keep_alive=0).done_reason == "unload"
    assert MODEL_ID not in loaded()
    assert client.chat(model=MODEL_ID, messages=HI, options=FAST, keep_alive=0).message.content
    deadline = time.monotonic() + 30
    while MODEL_ID in loaded() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert MODEL_ID not in loaded()
    assert client.chat(model=MODEL_ID, messages=HI, options=FAST).message.content  # loads again
