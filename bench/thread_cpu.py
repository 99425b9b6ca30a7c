"""CPU per generated token, thread by thread, for Shimmy and llama.cpp's llama-server in one run:
where the last few percent of single-stream speed go on a small machine.

    .venv/bin/python bench/thread_cpu.py --llama-server PATH [--streams 1,8] [--seconds 20] [--repeat 2]

Each server (16 slots of 1024 tokens, flash attention off, llama-server at ``-t`` = cores) is
driven by ``--streams`` openai SDK clients in a loop (128 greedy tokens each, end-of-turn banned)
for ``--seconds``; the servers take turns.  From ``/proc/PID/task/*/stat`` before and after:
the CPU of the two busiest threads (the decode threads: the engine thread and llama.cpp's
OpenMP worker, or llama-server's) and of all the others (HTTP, JSON, Python), in microseconds
per generated token.  Then ``--requests`` one-token requests in a row (a cached prompt): the CPU
per request outside the decode threads (parsing, the chat template, tokenizing, the response).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import httpx

from batching_bench import llama_server
from common import EOS_ID, NO_CACHE, Server, demo_model_path

HZ = os.sysconf("SC_CLK_TCK")


def thread_ticks(pid: int) -> dict[str, int]:
    ticks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a thread that just ended
            continue
        ticks[tid] = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


def split(before: dict[str, int], after: dict[str, int], per: float) -> tuple[float, float]:
    """(CPU of the two busiest threads, CPU of the rest) in microseconds per ``per``."""
    used = sorted((after[t] - before.get(t, 0) for t in after), reverse=True)
    us = 1e6 / HZ / per
    return sum(used[:2]) * us, sum(used[2:]) * us


def drive(base: str, model_id: str, streams: int, seconds: float) -> int:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="local", max_retries=0, timeout=600)
    end = time.monotonic() + seconds
    counts = [0] * streams

    def loop(i: int) -> None:
        while time.monotonic() < end:
            stream = client.chat.completions.create(
                model=model_id, messages=[{"role": "user", "content": f"Write a story, number {i}."}],
                max_tokens=128, temperature=0, stream=True, logit_bias={str(EOS_ID): -100}, extra_headers=NO_CACHE)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def measure(server: Server, model_id: str, streams: int, seconds: float, requests: int) -> dict:
    pid = server.proc.pid
    drive(server.base, model_id, 1, 2)  # load and warm up
    before, started = thread_ticks(pid), time.monotonic()
    tokens = drive(server.base, model_id, streams, seconds)
    wall = time.monotonic() - started
    decode, rest = split(before, thread_ticks(pid), tokens)
    body = {"model": model_id, "messages": [{"role": "user", "content": "Write a story."}], "max_tokens": 1,
            "temperature": 0}
    with httpx.Client(base_url=server.base, timeout=60) as client:
        client.post("/v1/chat/completions", json=body, headers=NO_CACHE)
        before = thread_ticks(pid)
        for _ in range(requests):
            client.post("/v1/chat/completions", json=body, headers=NO_CACHE).raise_for_status()
        _, per_request = split(before, thread_ticks(pid), requests)
    return {"rate": tokens / wall, "decode": decode, "rest": rest, "request": per_request}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-server", metavar="PATH", required=True)
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    model = demo_model_path()
    model_id = model.name[: -len(".gguf")]
    cores = os.cpu_count() or 1
    starts = {"Shimmy default": lambda: Server(model, "--parallel", "16", "--ctx-size", "1024"),
              f"llama-server -t {cores}": lambda: Server(
                  model, command=llama_server(args.llama_server, model, 16, 1024, cores, cores))}
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeat):
        for name, start in starts.items():
            server = start()
            try:
                for n in (int(x) for x in args.streams.split(",")):
                    results.setdefault((name, n), []).append(
                        measure(server, model_id, n, args.seconds, args.requests))
            finally:
                server.stop()
    print(f"\n{cores} cores; medians of {args.repeat} server starts\n")
    print("| server | streams | tok/s | decode threads, CPU us/token | other threads, CPU us/token "
          "| other threads, CPU us per one-token request |")
    print("|---|---|---|---|---|---|")
    for (name, n), runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {name} | {n} | {med['rate']:.1f} | {med['decode']:.0f} | {med['rest']:.0f} | "
              f"{med['request']:.0f} |")


if __name__ == "__main__":
    main()
