"""Real clients against a real `shimmy serve` with an embedding model (MiniLM, GGUF) and a chat
model (SmolLM2): the openai SDK's ``embeddings.create`` (floats and base64) and its errors, and
LangChain's ``OpenAIEmbeddings`` and ``ChatOpenAI`` pointed at ``/v1``."""

from __future__ import annotations

import math

import pytest

from tests.conftest import MODEL_ID, sdk_client, serve_model

pytestmark = pytest.mark.slow
EMBED = "all-MiniLM-L6-v2.f16"


@pytest.fixture(scope="module")
def server(start_server, minilm_gguf_path, smollm2_path):
    return serve_model(start_server, minilm_gguf_path, "--model", str(smollm2_path))


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_openai_sdk_floats_and_base64(server):
    client = sdk_client(server)
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "Interest rates went up."]
    floats = client.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2] and len(floats.data[0].embedding) == 384
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0 and floats.model == EMBED
    # No encoding_format: the SDK asks for base64 and decodes it itself.
    decoded = client.embeddings.create(model=EMBED, input=texts)
    for a, b in zip(floats.data, decoded.data):
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding)) < 1e-6
    a, b, c = (d.embedding for d in floats.data)
    assert cosine(a, b) > cosine(a, c)


def test_openai_sdk_errors(server):
    import openai

    client = sdk_client(server)
    cases = [
        (dict(model=MODEL_ID, input="hi"), "wrong_model_kind"),
        (dict(model=EMBED, input="word " * 1000), "context_length_exceeded"),
        (dict(model=EMBED, input="hi", dimensions=64), "dimensions_not_supported"),
    ]
    for kwargs, code in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.embeddings.create(**kwargs)
        assert info.value.code == code, info.value
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "wrong_model_kind"
    ok = client.embeddings.create(model=EMBED, input="word " * 1000, extra_body={"truncate": True})
    assert ok.usage.prompt_tokens == 512


def test_langchain_embeddings_and_chat(server):
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model=EMBED, base_url=server.url, api_key="sk-local",
                                  check_embedding_ctx_length=False, max_retries=0)
    docs = embeddings.embed_documents(["The cat sat on the mat.", "Stocks fell today."])
    query = embeddings.embed_query("Where did the cat sit?")
    assert len(docs) == 2 and len(query) == 384
    assert cosine(query, docs[0]) > cosine(query, docs[1])
    chat = ChatOpenAI(model=MODEL_ID, base_url=server.url, api_key="sk-local", max_tokens=8, temperature=0,
                      max_retries=0)
    answer = chat.invoke("Say hello.")
    assert isinstance(answer.content, str) and answer.content
