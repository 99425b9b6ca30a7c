"""Measure `shimmy route` in one run: direct to one instance, then through the front to one, two
and three instances (each with its share of the cores as --threads; one instance gets Shimmy's
default, decode on half the cores and prompts on all), and the cached-token share with the
cache-aware policy against round-robin.

    .venv/bin/python bench/route_bench.py [--clients 8] [--chats 2] [--turns 3] [--tokens 32]

The load: ``clients`` threads, each holding ``chats`` multi-turn conversations one after the
other (``turns`` turns; every conversation has its own system prompt), streaming with the openai
SDK; every answer is ``tokens`` long (max_tokens, and a logit_bias that bans the end-of-turn
token).  Aggregate tok/s is the completion tokens of all requests over the wall time; TTFT is
per request; the cached share is the prompt tokens the upstreams reported as cached
(``usage.prompt_tokens_details.cached_tokens``) over all prompt tokens.  The front's added
latency is the median, over sequential one-token requests, of (through the front - direct) to
the same instance.  Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import openai

from common import EOS_ID, Server, demo_model_path, free_port

SERVE_ARGS = ("--parallel", "4", "--ctx-size", "2048")


class Front:
    """`shimmy route` over ``bases`` in a subprocess."""

    def __init__(self, bases: list[str], policy: str = "cache-aware"):
        self.port = free_port()
        self.home = tempfile.TemporaryDirectory()
        argv = [sys.executable, "-m", "shimmy_core", "route", "--port", str(self.port), "--policy", policy,
                "--health-interval", "0.5"]
        for base in bases:
            argv += ["--upstream", base]
        self.proc = subprocess.Popen(argv, env={**os.environ, "SHIMMY_HOME": self.home.name},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base + "/health", timeout=1).json().get("status") == "ok":
                    return
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.05)
        raise RuntimeError("the front did not come up")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.home.cleanup()


def _conversation(client: openai.OpenAI, model: str, tag: str, turns: int, tokens: int) -> list[dict]:
    messages = [{"role": "system", "content": f"You are storyteller {tag}. You write vivid, concrete prose."},
                {"role": "user", "content": f"Story {tag}: begin a tale about a lighthouse keeper."}]
    records = []
    for turn in range(turns):
        sent = time.perf_counter()
        first, text, usage = None, [], None
        for chunk in client.chat.completions.create(
                model=model, messages=messages, max_tokens=tokens, temperature=0, stream=True,
                logit_bias={str(EOS_ID): -100}, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
        details = usage.prompt_tokens_details
        records.append({"ttft": (first or time.perf_counter()) - sent, "completion": usage.completion_tokens,
                        "prompt": usage.prompt_tokens, "cached": details.cached_tokens if details else 0})
        messages += [{"role": "assistant", "content": "".join(text)},
                     {"role": "user", "content": f"Go on with part {turn + 2}."}]
    return records


def load(base: str, model: str, label: str, args) -> dict:
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=600)

    def one_client(i: int) -> list[dict]:
        out = []
        for chat in range(args.chats):
            out += _conversation(client, model, f"{label}-{i}-{chat}", args.turns, args.tokens)
        return out

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        records = [r for rs in pool.map(one_client, range(args.clients)) for r in rs]
    wall = time.perf_counter() - started
    ttfts = sorted(r["ttft"] for r in records)
    return {"tok_s": sum(r["completion"] for r in records) / wall,
            "p50": statistics.median(ttfts) * 1000,
            "p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))] * 1000,
            "cached": sum(r["cached"] for r in records) / sum(r["prompt"] for r in records),
            "requests": len(records), "wall": wall}


def added_latency(direct: str, front: str, model: str, runs: int) -> float:
    """Median (front - direct) of sequential one-token requests to the same instance, in ms."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    times = {direct: [], front: []}
    with httpx.Client(timeout=60) as http:
        for i in range(runs):
            for base in (direct, front) if i % 2 else (front, direct):
                sent = time.perf_counter()
                http.post(base + "/v1/chat/completions", json=body).raise_for_status()
                times[base].append(time.perf_counter() - sent)
    return (statistics.median(times[front]) - statistics.median(times[direct])) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--chats", type=int, default=1)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--latency-runs", type=int, default=40)
    args = parser.parse_args()
    model_path = demo_model_path()
    model = model_path.name.removesuffix(".gguf")
    cores = os.cpu_count() or 1
    rows = []

    whole = f"{max(1, cores // 2)}/{cores}"   # Shimmy's default: decode on half the cores, prompts on all
    one = Server(model_path, *SERVE_ARGS)
    try:
        rows.append(("direct, 1 instance", whole, load(one.base, model, "direct", args)))
        front = Front([one.base])
        try:
            latency = added_latency(one.base, front.base, model, args.latency_runs)
            rows.append(("front, 1 instance", whole, load(front.base, model, "front1", args)))
        finally:
            front.stop()
    finally:
        one.stop()
    single = Server(model_path, *SERVE_ARGS, "--threads", "1")
    try:   # the same thread count as the two- and three-instance workers, to tell the two effects apart
        rows.append(("direct, 1 instance, --threads 1", "1/1", load(single.base, model, "single", args)))
    finally:
        single.stop()
    for count in (2, 3):
        share = max(1, cores // count)
        servers = [Server(model_path, *SERVE_ARGS, "--threads", str(share)) for _ in range(count)]
        try:
            policies = ("cache-aware", "round-robin") if count == 3 else ("cache-aware",)
            for policy in policies:
                front = Front([s.base for s in servers], policy)
                try:
                    name = f"front, {count} instances" + (f" ({policy})" if count == 3 else "")
                    rows.append((name, f"{share}/{share}", load(front.base, model, f"{policy}{count}", args)))
                finally:
                    front.stop()
        finally:
            for server in servers:
                server.stop()

    print(f"{platform.processor() or platform.machine()}, {cores} cores, {platform.system()} (load average "
          f"{os.getloadavg()[0]:.1f} at the end); SmolLM2-135M Q4_1; "
          f"{args.clients} clients x {args.chats} chats x {args.turns} turns, {args.tokens} tokens per answer, "
          f"serve {' '.join(SERVE_ARGS)}\n")
    print("| setup | threads each (decode/prompt) | tok/s | TTFT p50 ms | TTFT p95 ms | cached share | requests |")
    print("|---|---|---|---|---|---|---|")
    for name, threads, r in rows:
        print(f"| {name} | {threads} | {r['tok_s']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['cached']:.0%} "
              f"| {r['requests']} |")
    print(f"\nThe front's added latency per request (median of {args.latency_runs} one-token requests, "
          f"front - direct, same instance): {latency:.2f} ms")


if __name__ == "__main__":
    main()
