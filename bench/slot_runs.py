"""Two streams that run together, when the free slots all hold chat histories: do they land in
neighbouring slots?  With one KV stream per slot, llama.cpp computes each run of consecutive
streams in a batch as a pass of its own, so two streams in slots 0 and 2 cost two passes a step.

    .venv/bin/python bench/slot_runs.py [--tokens 256] [--repeat 3]

On a ``--parallel 4 --ctx-size 1024`` server: four chats fill slots 0-3 (one turn each), the
second chat gets another turn (so the third is now the least recently used), then two new
streams start together.  The first takes the least recently used slot; the second would take
the next least recently used one, two slots away; the engine instead moves the chat in its way
to that slot and takes the neighbouring one.  Printed: the two streams' aggregate tokens/s, and
whether the second chat's next turn still finds its cells (``cached_tokens``).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import httpx

from common import EOS_ID, NO_CACHE, Server, demo_model_path

MODEL = demo_model_path().name[: -len(".gguf")]


def chat(base: str, messages: list[dict], tokens: int) -> dict:
    body = {"model": MODEL, "messages": messages, "max_tokens": tokens, "temperature": 0,
            "logit_bias": {str(EOS_ID): -100}}
    reply = httpx.post(base + "/v1/chat/completions", json=body, headers=NO_CACHE, timeout=600)
    reply.raise_for_status()
    return reply.json()


def one_run(tokens: int) -> dict:
    server = Server(demo_model_path(), "--parallel", "4", "--ctx-size", "1024")
    try:
        base = server.base
        chats = [[{"role": "user", "content": f"Tell me about the history of {topic}."}]
                 for topic in ("bread", "ships", "clocks", "maps")]
        for messages in chats:  # slots 0-3 each hold a chat of 150+ tokens
            answer = chat(base, messages, 150)
            messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        chats[1].append({"role": "user", "content": "And then?"})  # the second chat's slot is fresh again
        answer = chat(base, chats[1], 8)
        chats[1].append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})

        results: list[dict] = [{}, {}]

        def stream(i: int) -> None:
            results[i] = chat(base, [{"role": "user", "content": f"Write a long poem, number {i}."}], tokens)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        start = time.perf_counter()
        for t in threads:
            t.start()
            time.sleep(0.05)  # the second arrives while the first is running
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        generated = sum(r["usage"]["completion_tokens"] for r in results)
        chats[1].append({"role": "user", "content": "Thanks!"})
        again = chat(base, chats[1], 4)
        cached = (again["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return {"rate": generated / wall, "cached": cached, "prompt": again["usage"]["prompt_tokens"]}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runs = [one_run(args.tokens) for _ in range(args.repeat)]
    rates = [r["rate"] for r in runs]
    print(f"two streams of {args.tokens} tokens: {statistics.median(rates):.1f} tok/s aggregate "
          f"(runs: {', '.join(f'{x:.1f}' for x in rates)}); the moved chat's next turn reused "
          f"{runs[0]['cached']} of {runs[0]['prompt']} prompt tokens")


if __name__ == "__main__":
    main()
