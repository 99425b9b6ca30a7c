"""Do running streams stay in neighbouring slots?  With one KV stream per slot, llama.cpp
computes each run of consecutive streams in a batch as a pass of its own, so two streams in
slots 0 and 2 cost two passes a step.

    .venv/bin/python bench/slot_runs.py [--tokens 256] [--repeat 3]

- ``histories``: on a ``--parallel 4 --ctx-size 1024`` server, four chats fill slots 0-3 (one
  turn each), the second chat gets another turn (so the third is now the least recently used),
  then two new streams start together.  The first takes the least recently used slot; the
  second would take the next least recently used one, two slots away; the engine instead moves
  the chat in its way to that slot and takes the neighbouring one.  Printed: the two streams'
  aggregate tokens/s, and whether the moved chat's next turn still finds its cells
  (``cached_tokens``).
- ``passes``: bare llama-cpp-python (``batch_invariance.Context``: 16 sequences of 1024 cells,
  the engine's context settings): the time of a step of one token per sequence, for sets of slots
  with and without gaps (median of 9 steps, three passes).
- ``gap``: on a ``--parallel 3`` server, streams in slots 0, 1 and 2, the middle one 16 tokens
  long: when it ends, the engine moves the third stream down into its slot.  Printed: the
  aggregate tokens/s of the two long streams.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import httpx

from batch_invariance import Context
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


def passes() -> None:
    c = Context(str(demo_model_path()), n_seq=16)  # the engine's context settings
    position: dict[int, int] = {}

    def step(seqs: list[int], n: int = 1) -> float:
        items = []
        for seq in seqs:
            for j in range(n):
                items.append((seq, position.get(seq, 0), 100 + j))
                position[seq] = position.get(seq, 0) + 1
        started = time.perf_counter()
        c.decode(items)
        return (time.perf_counter() - started) * 1000

    for seq in range(8):
        step([seq], 40)  # a 40-token prompt in each
    sets = ([0, 1], [0, 2], [0, 1, 2], [0, 1, 3], [0, 1, 2, 3], [0, 1, 3, 4])
    for n in range(3):
        print(f"pass {n + 1}: " + ", ".join(
            f"{seqs} {statistics.median(step(seqs) for _ in range(9)):.1f} ms" for seqs in sets))


def gap_run(tokens: int) -> float:
    server = Server(demo_model_path(), "--parallel", "3", "--ctx-size", "1024")
    try:
        def stream(content: str, n: int, first: threading.Event, out: list) -> None:
            body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": n,
                    "temperature": 0, "stream": True, "logit_bias": {str(EOS_ID): -100},
                    "stream_options": {"include_usage": True}}
            with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, headers=NO_CACHE,
                              timeout=600) as reply:
                for line in reply.iter_lines():
                    first.set()
                    if '"completion_tokens"' in line:
                        out.append(int(line.split('"completion_tokens":')[1].split(",")[0].split("}")[0]))

        chat(server.base, [{"role": "user", "content": "Hello"}], 2)  # load the model
        counts: list[int] = []
        threads = []
        start = time.perf_counter()
        for i, n in enumerate((tokens, 16, tokens)):  # slots 0, 1, 2, in turn
            first = threading.Event()
            out = counts if n == tokens else []
            threads.append(threading.Thread(target=stream, args=(f"Write a long poem, number {i}.", n, first, out)))
            threads[-1].start()
            first.wait(60)
        for t in threads:
            t.join()
        return sum(counts) / (time.perf_counter() - start)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scenario", choices=("histories", "passes", "gap"), default="histories")
    args = parser.parse_args()
    if args.scenario == "passes":
        passes()
        return
    if args.scenario == "gap":
        rates = [gap_run(args.tokens) for _ in range(args.repeat)]
        print(f"two streams of {args.tokens} tokens around a 16-token one: {statistics.median(rates):.1f} tok/s "
              f"aggregate (runs: {', '.join(f'{x:.1f}' for x in rates)})")
        return
    runs = [one_run(args.tokens) for _ in range(args.repeat)]
    rates = [r["rate"] for r in runs]
    print(f"two streams of {args.tokens} tokens: {statistics.median(rates):.1f} tok/s aggregate "
          f"(runs: {', '.join(f'{x:.1f}' for x in rates)}); the moved chat's next turn reused "
          f"{runs[0]['cached']} of {runs[0]['prompt']} prompt tokens")


if __name__ == "__main__":
    main()
