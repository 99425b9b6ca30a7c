"""Continuous batching on a real server: concurrent sequences share one GGUF
model, give the same text as alone, free their slot when cancelled, queue, and
refuse with 503 when the queue is full."""

from __future__ import annotations

import concurrent.futures
import threading
import uuid

import httpx
import openai
import pytest

from tests.conftest import MODEL_ID, open_stream

PROMPTS = ["Name three colors.", "Write a haiku about rain.", "What is the capital of Italy?",
           "Give me a tip for sleeping well."]


# Every request here must really run on the engine, never come from the response cache.
NO_CACHE = {"Cache-Control": "no-cache"}


def chat(client, content: str, **kwargs) -> str:
    r = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": content}], extra_headers=NO_CACHE,
        **{"max_tokens": 32, **kwargs}
    )
    return r.choices[0].message.content


def stream_text(client, content: str, **kwargs) -> str:
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": content}], stream=True, extra_headers=NO_CACHE,
        **{"max_tokens": 32, **kwargs}
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_greedy_text_is_the_same_alone_and_batched(client):
    alone = [chat(client, p, temperature=0) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: stream_text(client, p, temperature=0), PROMPTS))
    assert together == alone


def test_seed_reproduces_under_concurrency(client):
    alone = chat(client, PROMPTS[1], temperature=1.0, seed=42)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(stream_text, client, p, temperature=1.0) for p in PROMPTS[2:]]
        seeded = [pool.submit(chat, client, PROMPTS[1], temperature=1.0, seed=42) for _ in range(2)]
        [f.result() for f in others]
    assert [f.result() for f in seeded] == [alone, alone]


BIRDS = "Here is a list of the birds I saw this spring: " + ", ".join(f"bird {i}" for i in range(60))


def probe(client, messages, **kwargs):
    """A greedy request's first tokens with their top logprobs, and its usage."""
    r = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, logprobs=True,
                                       top_logprobs=5, extra_headers=NO_CACHE, **{"max_tokens": 2, **kwargs})
    numbers = [[(t.token, t.logprob) for t in lp.top_logprobs] for lp in r.choices[0].logprobs.content]
    return numbers, r.usage


def test_a_cached_prompt_gives_the_same_numbers_as_a_fresh_one(client, start_server, smollm2_path):
    """The prefix cache changes no number of a greedy request for the demo model, over many
    prompt lengths: a prompt computed from scratch (on a server that never saw it), the same
    prompt with all but its last two tokens from the cache (the cells a longer chat left), and
    the same prompt once more (held whole, started from the logits the last time stored) give
    bit-identical logprobs.  (Computing its last token alone, as the engine once did, changed
    the logits at a third of the lengths: bench/batch_invariance.py.)"""
    fresh_server = start_server(["--model", str(smollm2_path), "--no-demo"])
    fresh_client = openai.OpenAI(base_url=fresh_server.url, api_key="sk-local", max_retries=0, timeout=120)
    nonce = uuid.uuid4().hex[:8]
    for n in range(0, 40, 3):
        messages = [{"role": "user", "content": f"{nonce} {n}: {BIRDS} " + " ".join(f"fish {i}" for i in range(n))}]
        fresh, fresh_usage = probe(fresh_client, messages)
        probe(client, messages + [{"role": "assistant", "content": "Noted."}, {"role": "user", "content": "More?"}])
        again, again_usage = probe(client, messages)
        held, held_usage = probe(client, messages)
        assert fresh_usage.prompt_tokens_details.cached_tokens < 100  # the system prompt at most
        assert again_usage.prompt_tokens_details.cached_tokens == again_usage.prompt_tokens - 2
        assert held_usage.prompt_tokens_details.cached_tokens == held_usage.prompt_tokens
        assert again == fresh, n
        assert held == fresh, n


def stored_starts(server) -> int:
    """Requests whose prompt a slot held whole, started from its stored logits."""
    models = httpx.get(server.base + "/health", timeout=10).json()["models"]
    return sum(m.get("stored_logits_starts", 0) for m in models if m["id"] == MODEL_ID)


def test_the_same_prompt_again_computes_nothing_and_answers_the_same(client, server):
    """A prompt a slot holds whole (the same request again, the response cache bypassed) starts
    from the logits its last computation stored: no prompt token is computed, and greedy, seeded
    and n-choice requests give what they gave the first time."""
    content = f"{uuid.uuid4().hex[:8]} Write a haiku about the sea."
    first = chat(client, content, temperature=0)
    before, starts = decoded(server), stored_starts(server)
    assert chat(client, content, temperature=0) == first
    assert decoded(server) == before
    assert stored_starts(server) == starts + 1
    seeded = chat(client, content, temperature=1.0, seed=11)
    assert [chat(client, content, temperature=1.0, seed=11) for _ in range(2)] == [seeded, seeded]
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": content}], n=3,
                                       max_tokens=32, temperature=0, extra_headers=NO_CACHE)
    assert [c.message.content for c in r.choices] == [first] * 3
    assert r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens
    assert decoded(server) == before


def _shared_prompt_batches(server) -> int:
    """How many llama_decode calls held several prompts (0 before the model loads)."""
    models = httpx.get(server.base + "/health", timeout=10).json()["models"]
    return sum(m["shared_prompt_batches"] for m in models if m["id"] == MODEL_ID)


def test_prompts_computed_together_give_the_numbers_they_give_alone(client, server, start_server, smollm2_path):
    """Prompts that wait at the same time share one llama_decode, the same number of tokens of
    each: the numbers of each are those it gets alone on a server that never saw the others."""
    nonce = uuid.uuid4().hex[:8]
    prompts = [[{"role": "user", "content": f"{nonce} {k}: {BIRDS} " + " ".join(f"fish {i}" for i in range(7 * k))}]
               for k in range(4)]
    shared_before = _shared_prompt_batches(server)
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda m: probe(client, m, max_tokens=3)[0], prompts))
    assert _shared_prompt_batches(server) > shared_before   # the shared path ran
    fresh = start_server(["--model", str(smollm2_path), "--no-demo"])
    alone_client = openai.OpenAI(base_url=fresh.url, api_key="sk-local", max_retries=0, timeout=120)
    alone = [probe(alone_client, m, max_tokens=3)[0] for m in prompts]
    assert together == alone


def test_a_sequence_moved_into_a_gap_gives_the_text_it_gives_alone(start_server, smollm2_path):
    """Streams in slots 0, 1 and 2; the middle one goes away, and the engine moves the third down
    into its slot (the busy slots one run again: one pass a step).  The moved stream's greedy
    text is the one it gives alone."""
    srv = start_server(["--model", str(smollm2_path), "--no-demo", "--parallel", "3"])
    client = openai.OpenAI(base_url=srv.url, api_key="sk-local", max_retries=0, timeout=120)
    banned = {"logit_bias": {"2": -100}, "temperature": 0, "max_tokens": 40}

    def started(content: str):
        stream = iter(client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": content}], stream=True, extra_headers=NO_CACHE,
            **banned))
        first = next(c for c in stream if c.choices and c.choices[0].delta.content)
        return first.choices[0].delta.content, stream

    head_a, rest_a = started(PROMPTS[0])                       # slot 0
    middle = open_stream(srv)                                  # slot 1
    head_c, rest_c = started(PROMPTS[1])                       # slot 2
    middle.close()                                             # slot 1 frees while 0 and 2 run
    text_a = head_a + "".join(c.choices[0].delta.content or "" for c in rest_a if c.choices)
    text_c = head_c + "".join(c.choices[0].delta.content or "" for c in rest_c if c.choices)
    models = httpx.get(srv.base + "/health", timeout=10).json()["models"]
    assert sum(m["moved_sequences"] for m in models if m["id"] == MODEL_ID) >= 1
    assert text_c == stream_text(client, PROMPTS[1], **banned)
    assert text_a == stream_text(client, PROMPTS[0], **banned)


def test_batch_invariant_a_continued_chat_gives_the_numbers_of_a_fresh_server(start_server, smollm2_path):
    """--batch-invariant: a greedy chat continued from the cache (its earlier prompt and answer in
    a slot) gives bit-identical logprobs to the whole conversation sent to a server that never
    saw it.  (By default the answer's cells are reused, and they were computed one token per
    step: their numbers round differently from the same tokens inside a prompt.)"""
    def invariant_client():
        server = start_server(["--model", str(smollm2_path), "--no-demo", "--batch-invariant", "--no-cache"])
        return openai.OpenAI(base_url=server.url, api_key="sk-local", max_retries=0, timeout=120)

    client, fresh_client = invariant_client(), invariant_client()
    first = [{"role": "user", "content": f"{uuid.uuid4().hex[:8]} {BIRDS}. Which one came first?"}]
    answer = client.chat.completions.create(model=MODEL_ID, messages=first, max_tokens=24, temperature=0,
                                            extra_headers=NO_CACHE).choices[0].message.content
    chat_so_far = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the last?"}]
    continued, usage = probe(client, chat_so_far, max_tokens=4)
    assert usage.prompt_tokens_details.cached_tokens >= 128  # whole prompt chunks, no answer cells
    assert usage.prompt_tokens_details.cached_tokens % 128 == 0
    fresh, fresh_usage = probe(fresh_client, chat_so_far, max_tokens=4)
    assert fresh_usage.prompt_tokens_details.cached_tokens == 0
    assert continued == fresh


def test_n_choices_run_as_parallel_sequences(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": PROMPTS[0]}],
                                       n=4, max_tokens=16, temperature=0, extra_headers=NO_CACHE)
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) == 1 and texts[0] == chat(client, PROMPTS[0], temperature=0, max_tokens=16)
    assert r.usage.prompt_tokens == client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=1).usage.prompt_tokens


def decoded(server) -> int:
    """Prompt tokens the engine has really processed (reused KV cells count none)."""
    models = httpx.get(server.base + "/health", timeout=5).json()["models"]
    return sum(m.get("prompt_tokens_decoded", 0) for m in models)


def test_n_choices_process_their_shared_prompt_once(client, server):
    question = [{"role": "user", "content": "Here is a list of the birds I saw this spring: " +
                 ", ".join(f"bird {i}" for i in range(60)) + ". Which one came first?"}]
    before = decoded(server)
    r = client.chat.completions.create(model=MODEL_ID, messages=question, n=3, max_tokens=12, temperature=0,
                                       extra_headers=NO_CACHE)
    spent = decoded(server) - before
    prompt = r.usage.prompt_tokens
    assert prompt > 200
    # the first choice processes what no slot held; the other two take its cells and logits
    assert spent == prompt - r.usage.prompt_tokens_details.cached_tokens, (spent, r.usage)
    texts = [c.message.content for c in r.choices]
    assert texts == [texts[0]] * 3


def test_prefix_reuse_shows_in_cached_tokens(client):
    history = [{"role": "user", "content": "My name is Ada and I like sailing. " * 8}]
    first = client.chat.completions.create(model=MODEL_ID, messages=history, max_tokens=8, temperature=0,
                                           extra_headers=NO_CACHE)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "What do I like?"}]
    second = client.chat.completions.create(model=MODEL_ID, messages=history, max_tokens=8, temperature=0,
                                            extra_headers=NO_CACHE)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 1, (cached, first.usage.prompt_tokens)
    assert cached < second.usage.prompt_tokens


def test_an_idle_chat_keeps_its_cache_when_another_request_comes(client):
    history = [{"role": "user", "content": "My name is Grace and I collect old maps of the sea. " * 12}]
    first = client.chat.completions.create(model=MODEL_ID, messages=history, max_tokens=8, temperature=0,
                                           extra_headers=NO_CACHE)
    for question in PROMPTS:  # unrelated requests, one at a time: each needs a slot
        chat(client, question, max_tokens=4)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "What do I collect?"}]
    second = client.chat.completions.create(model=MODEL_ID, messages=history, max_tokens=8, temperature=0,
                                            extra_headers=NO_CACHE)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1, second.usage


def test_a_new_slot_takes_the_prefix_of_a_busy_one(client, server):
    system = {"role": "system", "content": "You are the test assistant of Shimmy. Answer briefly and kindly. " * 4}
    question = [system, {"role": "user", "content": "Name a fruit."}]

    def ask():
        return client.chat.completions.create(model=MODEL_ID, messages=question, max_tokens=16, temperature=0,
                                              extra_headers=NO_CACHE)

    alone = ask()  # computed from scratch: no slot holds this system prompt yet
    # A long stream with the same system prompt takes the slot that holds it...
    sock = open_stream(server, messages=[system, {"role": "user", "content": "Write a very long story."}])
    try:
        shared = ask()  # ...so this one gets a fresh slot and the prefix from the busy one
    finally:
        sock.close()
    assert shared.choices[0].message.content == alone.choices[0].message.content
    assert shared.usage.prompt_tokens_details.cached_tokens >= alone.usage.prompt_tokens - 12, shared.usage


# ------------------------------------------------------------------ one slot, a tiny queue
def queued_count(server) -> int:
    return sum(m.get("queued", 0) for m in httpx.get(server.base + "/health", timeout=5).json()["models"])


@pytest.fixture(scope="module")
def one_slot(start_server, smollm2_path):
    server = start_server(["--model", str(smollm2_path), "--no-demo"],
                          SHIMMY_PARALLEL="1", SHIMMY_QUEUE_SIZE="1", SHIMMY_QUEUE_TIMEOUT="20")
    httpx.get(server.base + "/health", timeout=30).raise_for_status()
    return server


def test_full_queue_gets_503_with_retry_after_and_health_stays_up(one_slot, validate):
    running = open_stream(one_slot)
    try:
        queued_result = {}

        def queued():
            queued_result["r"] = httpx.post(one_slot.url + "/chat/completions", timeout=60, json={
                "model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})

        waiter = threading.Thread(target=queued)
        waiter.start()
        while queued_count(one_slot) < 1:
            pass
        # one slot busy, the queue (size 1) full: the next request is refused at once
        r = httpx.post(one_slot.url + "/chat/completions", timeout=30, json={
            "model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        validate(r.json(), "ErrorResponse")
        assert r.json()["error"]["code"] == "server_overloaded"
        assert httpx.get(one_slot.base + "/health", timeout=5).status_code == 200
    finally:
        running.close()  # frees the slot: the queued request runs now
    waiter.join(timeout=60)
    assert queued_result["r"].status_code == 200


def test_cancelled_stream_frees_its_slot(one_slot):
    sock = open_stream(one_slot)
    sock.close()
    # with one slot, this request can only run once the abandoned sequence is gone
    client = openai.OpenAI(base_url=one_slot.url, api_key="x", max_retries=0, timeout=30)
    assert chat(client, "hi", max_tokens=2) is not None


def test_waiting_past_the_queue_timeout_is_503(start_server, smollm2_path):
    server = start_server(["--model", str(smollm2_path), "--no-demo"],
                          SHIMMY_PARALLEL="1", SHIMMY_QUEUE_SIZE="4", SHIMMY_QUEUE_TIMEOUT="1")
    running = open_stream(server)
    try:
        r = httpx.post(server.url + "/chat/completions", timeout=30, json={
            "model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout"
        assert "retry-after" in r.headers
    finally:
        running.close()
