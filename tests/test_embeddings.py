"""Embeddings and reranking end to end in one process: discovery lists the models by kind, the
OpenAI dialect's ``/v1/embeddings`` and ``/v1/rerank`` run them through the core's embedding
service, on all-MiniLM-L6-v2 as SafeTensors and as GGUF, and on a tiny random cross-encoder in
both formats."""

from __future__ import annotations

import base64
import json
import math
import shutil
import struct

import falcon.testing
import pytest

from shimmy_core.app import build, create_app
from shimmy_core.contract.settings import Settings
from shimmy_core.plugin_manager import create_plugin_manager
from tests.conftest import builtin

pytestmark = pytest.mark.slow

SIMILAR = ["A man is playing a guitar.", "Someone plays an acoustic guitar on stage."]
UNRELATED = "The central bank raised interest rates by half a point."
MINILM_DIMS = 384


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.fixture(scope="module")
def matryoshka_path(minilm_path, tmp_path_factory):
    """MiniLM again, declaring (for the test's sake) that it was trained to be cut to 128 and 64."""
    folder = tmp_path_factory.mktemp("matryoshka") / "minilm-matryoshka"
    folder.mkdir()
    for item in minilm_path.iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "config_sentence_transformers.json").unlink()
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"matryoshka_dimensions": [384, 128, 64]}))
    return folder


@pytest.fixture(scope="module")
def app(minilm_path, minilm_gguf_path, reranker_path, reranker_gguf_path, matryoshka_path, smollm2_path, validate):
    models = (minilm_path, minilm_gguf_path, reranker_path, reranker_gguf_path, matryoshka_path, smollm2_path)
    settings = Settings.load({"demo": False, "models": tuple(str(p) for p in models)}, {})
    pm = create_plugin_manager(load_entry_points=False, extra_plugins=[
        builtin("gguf"), builtin("safetensors"), builtin("local_files"), builtin("openai")])
    shimmy = build(settings, pm)
    client = falcon.testing.TestClient(create_app(shimmy), headers={"Host": "localhost"})
    yield client
    shimmy.close()


ST, GGUF = "all-MiniLM-L6-v2", "all-MiniLM-L6-v2.f16"
RR_ST, RR_GGUF = "tiny-bert-reranker", "tiny-bert-reranker.f32"
CHAT = "SmolLM2-135M-Instruct.Q4_1"


def embed(app, model, input, status=200, **extra):
    result = app.simulate_post("/v1/embeddings", json={"model": model, "input": input, **extra})
    assert result.status_code == status, result.text
    return result.json


def vectors(body) -> list[list[float]]:
    return [item["embedding"] for item in sorted(body["data"], key=lambda d: d["index"])]


# ------------------------------------------------------------------ discovery
def test_models_are_listed_by_kind(app):
    kinds = {m["id"]: m["kind"] for m in app.simulate_get("/v1/models").json["data"]}
    assert kinds[ST] == kinds[GGUF] == "embedding"
    assert kinds[RR_ST] == kinds[RR_GGUF] == "rerank"
    assert kinds[CHAT] == "chat"


# ------------------------------------------------------------------ embeddings
@pytest.mark.parametrize("model", [ST, GGUF])
def test_embeddings_body_is_valid_and_similar_texts_are_close(app, validate, model):
    body = embed(app, model, [*SIMILAR, UNRELATED])
    validate(body, "CreateEmbeddingResponse")
    assert body["model"] == model and body["object"] == "list"
    a, b, c = vectors(body)
    assert len(a) == MINILM_DIMS
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in (a, b, c))  # normalized
    assert cosine(a, b) > cosine(a, c) + 0.3 and cosine(a, b) > cosine(b, c) + 0.3
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 10


def test_the_two_formats_agree(app):
    texts = [*SIMILAR, UNRELATED, "Shimmy serves local models."]
    for x, y in zip(vectors(embed(app, ST, texts)), vectors(embed(app, GGUF, texts))):
        assert cosine(x, y) >= 0.99
    assert embed(app, ST, texts)["usage"] == embed(app, GGUF, texts)["usage"]


@pytest.mark.parametrize("model", [ST, GGUF])
def test_a_batch_gives_what_each_input_gives_alone(app, model):
    texts = [f"sentence number {i} " + "word " * (i % 7) for i in range(40)]
    together = vectors(embed(app, model, texts))
    for i in (0, 17, 39):
        assert cosine(together[i], vectors(embed(app, model, texts[i]))[0]) > 0.9999


@pytest.mark.parametrize("model", [ST, GGUF])
def test_token_ids_are_the_models_own(app, minilm_path, model):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(minilm_path))(SIMILAR)["input_ids"]  # with [CLS] ... [SEP]
    by_text = vectors(embed(app, model, SIMILAR))
    by_ids = embed(app, model, ids)
    assert by_ids["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
    for x, y in zip(by_text, vectors(by_ids)):
        assert cosine(x, y) > 0.9999
    assert cosine(vectors(embed(app, model, ids[0]))[0], by_text[0]) > 0.9999  # one list of ids
    error = embed(app, model, [[1, 2, 10**9]], status=400)["error"]
    assert error["code"] == "invalid_token" and "vocabulary" in error["message"]


@pytest.mark.parametrize("model", [ST, GGUF])
def test_base64_is_little_endian_float32(app, model):
    floats = vectors(embed(app, model, SIMILAR[0]))[0]
    encoded = embed(app, model, SIMILAR[0], encoding_format="base64")["data"][0]["embedding"]
    raw = base64.b64decode(encoded)
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == MINILM_DIMS
    assert max(abs(x - y) for x, y in zip(floats, decoded)) < 1e-6


@pytest.mark.parametrize("model, context", [(ST, 256), (GGUF, 512)])
def test_input_over_the_context_is_refused_unless_truncate(app, model, context):
    long = "lorem ipsum dolor " * 300
    error = embed(app, model, ["short", long], status=400)["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "input"
    assert "Input 1" in error["message"] and f"at most {context} tokens" in error["message"]
    body = embed(app, model, ["short", long], truncate=True)
    assert body["usage"]["prompt_tokens"] == 3 + context
    assert len(vectors(body)[1]) == MINILM_DIMS


def test_dimensions_need_a_matryoshka_model(app, validate):
    assert len(vectors(embed(app, ST, "x", dimensions=MINILM_DIMS))[0]) == MINILM_DIMS  # its own size: fine
    for model in (ST, GGUF):
        error = embed(app, model, "x", dimensions=128, status=400)["error"]
        assert error["param"] == "dimensions" and error["code"] == "dimensions_not_supported"
    full = vectors(embed(app, "minilm-matryoshka", SIMILAR[0]))[0]
    body = embed(app, "minilm-matryoshka", SIMILAR[0], dimensions=128)
    validate(body, "CreateEmbeddingResponse")
    short = vectors(body)[0]
    assert len(short) == 128 and abs(sum(x * x for x in short) - 1) < 1e-6
    assert cosine(short, full[:128]) > 0.99999
    assert embed(app, "minilm-matryoshka", "x", dimensions=500, status=400)["error"]["param"] == "dimensions"


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": ["ok", ""]}, "input[1]"),
    ({"input": []}, "input"),
    ({"input": [1, "a"]}, "input"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "dimensions": True}, "dimensions"),
    ({}, "input"),
])
def test_invalid_embedding_requests(app, body, param):
    error = embed(app, ST, status=400, **body)["error"] if "input" in body else \
        app.simulate_post("/v1/embeddings", json={"model": ST}).json["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_models_used_for_what_they_are_not(app):
    error = embed(app, CHAT, "hello", status=400)["error"]
    assert error["code"] == "wrong_model_kind" and "chat model" in error["message"]
    assert "cannot make embeddings" in error["message"]
    chat = app.simulate_post("/v1/chat/completions", json={"model": ST, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and chat.json["error"]["code"] == "wrong_model_kind"
    assert "embedding model" in chat.json["error"]["message"] and "generate text" in chat.json["error"]["message"]
    completion = app.simulate_post("/v1/completions", json={"model": GGUF, "prompt": "hi"})
    assert completion.status_code == 400 and completion.json["error"]["code"] == "wrong_model_kind"
    for model in (ST, CHAT):
        rerank = app.simulate_post("/v1/rerank", json={"model": model, "query": "q", "documents": ["d"]})
        assert rerank.status_code == 400 and rerank.json["error"]["code"] == "wrong_model_kind"
    assert embed(app, RR_ST, "x", status=400)["error"]["code"] == "wrong_model_kind"
    assert embed(app, "no-such-model", "x", status=404)["error"]["code"] == "model_not_found"


# ------------------------------------------------------------------ rerank
DOCUMENTS = ["Paris is the capital of France.", "Bananas are yellow.", "The Eiffel Tower is in Paris.",
             {"text": "Berlin is in Germany."}]


@pytest.mark.parametrize("model, path", [(RR_ST, "/v1/rerank"), (RR_GGUF, "/rerank")])
def test_rerank_results_are_sorted_and_shaped(app, model, path):
    result = app.simulate_post(path, json={"model": model, "query": "What is the capital of France?",
                                           "documents": DOCUMENTS})
    assert result.status_code == 200, result.text
    body = result.json
    assert body["object"] == "list" and body["model"] == model
    assert sorted(r["index"] for r in body["results"]) == [0, 1, 2, 3]
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and all(isinstance(s, float) for s in scores)
    assert "document" not in body["results"][0]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 4 * 3
    top = app.simulate_post(path, json={"model": model, "query": "What is the capital of France?",
                                        "documents": DOCUMENTS, "top_n": 2, "return_documents": True}).json
    assert top["results"] == [{**r, "document": {"text": (lambda d: d if isinstance(d, str) else d["text"])(
        DOCUMENTS[r["index"]])}} for r in body["results"][:2]]


def test_safetensors_rerank_scores_are_the_cross_encoders_logits(app, reranker_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    query, docs = "capital of France", ["Paris is the capital.", "Bananas are yellow.", "x " * 40]
    tokenizer = AutoTokenizer.from_pretrained(str(reranker_path))
    model = AutoModelForSequenceClassification.from_pretrained(str(reranker_path)).eval()
    with torch.no_grad():
        expected = [model(**tokenizer(query, d, return_tensors="pt")).logits[0, 0].item() for d in docs]
    body = app.simulate_post("/v1/rerank", json={"model": RR_ST, "query": query, "documents": docs}).json
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    assert [round(got[i], 4) for i in range(3)] == [round(e, 4) for e in expected]


@pytest.mark.parametrize("model", [RR_ST, RR_GGUF])
def test_rerank_documents_over_the_context(app, model):
    body = {"model": model, "query": "q", "documents": ["short", "word " * 600]}
    error = app.simulate_post("/v1/rerank", json=body).json["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "documents"
    ok = app.simulate_post("/v1/rerank", json={**body, "truncate": True})
    assert ok.status_code == 200 and len(ok.json["results"]) == 2


@pytest.mark.parametrize("body, param", [
    ({"query": "q"}, "documents"),
    ({"query": "q", "documents": []}, "documents"),
    ({"query": "", "documents": ["d"]}, "query"),
    ({"query": "q", "documents": ["d"], "top_n": 0}, "top_n"),
    ({"query": "q", "documents": [{"txt": "d"}]}, "documents[0].text"),
])
def test_invalid_rerank_requests(app, body, param):
    result = app.simulate_post("/v1/rerank", json={"model": RR_ST, **body})
    assert result.status_code == 400 and result.json["error"]["param"] == param, result.text


def test_shimmy_list_shows_the_kind(minilm_path, reranker_path, capsys, monkeypatch, tmp_path):
    from shimmy_core.cli import main

    monkeypatch.setenv("SHIMMY_HOME", str(tmp_path))
    assert main(["list", "--no-demo", "--model", str(minilm_path), "--model", str(reranker_path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0][:3] == ["NAME", "KIND", "FORMAT"]
    assert {r[0]: r[1] for r in rows[1:] if r} == {ST: "embedding", RR_ST: "rerank"}
    assert main(["list", "--no-demo", "--json", "--model", str(minilm_path)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["kind"] == "embedding"
    shutil.rmtree(tmp_path, ignore_errors=True)
