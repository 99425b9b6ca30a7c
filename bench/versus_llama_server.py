"""Best against best: Shimmy at its defaults against llama.cpp's own server at its best thread
setting for this machine, in one run.

    .venv/bin/python bench/versus_llama_server.py --llama-server PATH [--streams 1,4,8,16]
        [--tokens 128] [--rounds 3] [--prompt-tokens 3000] [--thread-sets "1;2;1,2"]
        [--shimmy-args "..."] [--shimmy-args "--threads 1 --threads-batch 2" ...] [--distinct-prompts]

- Decode: 1, 4, 8 and 16 concurrent streams (openai SDK, streaming, greedy, the output length
  fixed by ``max_tokens`` and a ``logit_bias`` banning SmolLM2's end-of-turn token, the response
  cache bypassed).  The 8 prompts repeat round after round, so both servers find them in
  their caches; ``--distinct-prompts`` makes every request's prompt new (only the chat
  template's start is cached).  llama-server runs once per thread setting in ``--thread-sets`` (``T`` is
  ``-t T``, ``T,B`` is ``-t T -tb B``); for each stream count the best of them is its row.
  Shimmy runs once per ``--shimmy-args`` (none: its defaults); the ratio is the first one's.
- Prefill: time to the first token of one ``--prompt-tokens`` prompt, new each time (its first
  words differ, so no server reuses a cached prefix), median of 3, each server at its defaults
  but for a context that holds the prompt.

Both servers get 16 slots of 1024 tokens for the decode rows (llama-server: ``-np 16 -c 16384
--no-kv-unified``, as Shimmy keeps one KV stream per slot), and flash attention off.  The
llama-server binary is built from the llama.cpp that llama-cpp-python vendors
(docs/performance.md says how).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batching_bench import llama_server, streams_table  # noqa: E402
from common import NO_CACHE, Server, demo_model_path  # noqa: E402

SLOTS, CTX = 16, 1024
WORDS = ("river stone lantern orchard compass meadow harbor violin glacier copper thunder pepper "
         "saddle marble canyon feather ribbon anchor walnut blossom").split()


def long_prompt(run: int, tokens: int) -> str:
    """About ``tokens`` tokens of text that no earlier run began with."""
    words = [WORDS[(run * 7 + i * i) % len(WORDS)] for i in range(int(tokens * 0.98))]
    return f"Run {run} {time.time_ns()}: summarize this list in one line. " + " ".join(words)


def ttft(base: str, model_id: str, prompt: str) -> tuple[float, int]:
    """Seconds to the first streamed token of one chat request, and its prompt tokens."""
    body = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, prompt_tokens = None, 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=NO_CACHE, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"content":"' in line:
                first = time.perf_counter()
            if '"prompt_tokens"' in line:
                prompt_tokens = int(line.split('"prompt_tokens":')[1].split(",")[0].split("}")[0])
    return (first or time.perf_counter()) - sent, prompt_tokens


def prefill(server: Server, model_id: str, tokens: int, runs: int = 3) -> dict:
    ttft(server.base, model_id, "Hello")  # load
    times, counted = [], 0
    for run in range(runs):
        seconds, counted = ttft(server.base, model_id, long_prompt(run, tokens))
        times.append(seconds)
    median = statistics.median(times)
    return {"ttft": median, "prompt_tokens": counted, "rate": counted / median}


def llama_server_command(path: str, model: Path, threads: str, slots: int, ctx: int):
    """llama-server with Shimmy's slots and attention settings, at ``threads`` (``T`` or ``T,B``)."""
    t, _, b = threads.partition(",")
    return llama_server(path, model, slots, ctx, int(t), int(b or t))


def decode_rows(base: str, model_id: str, counts: list[int], tokens: int, rounds: int,
                distinct: bool) -> dict[int, dict]:
    """batching_bench's rows (after a load and a round on fresh slots), by stream count."""
    rows, _ = streams_table(base, model_id, counts, tokens, rounds, distinct)
    return {row["streams"]: row for row in rows}


def median_row(reps: list[dict]) -> dict:
    """One row from its repeats: the median aggregate and TTFT, the completions summed."""
    done = [r["complete"].split("/") for r in reps]
    return {"aggregate": statistics.median(r["aggregate"] for r in reps),
            "ttft_p50": statistics.median(r["ttft_p50"] for r in reps),
            "spread": (min(r["aggregate"] for r in reps), max(r["aggregate"] for r in reps)),
            "complete": f"{sum(int(a) for a, _ in done)}/{sum(int(b) for _, b in done)}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-server", metavar="PATH", required=True)
    parser.add_argument("--streams", default="1,4,8,16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    parser.add_argument("--thread-sets", default=None,
                        help="llama-server thread settings to try, ';'-separated: T or T,B (default: 1..cores)")
    parser.add_argument("--shimmy-args", action="append", default=None,
                        help="`shimmy serve` arguments of one Shimmy column (repeatable; default: one, none)")
    parser.add_argument("--distinct-prompts", action="store_true",
                        help="a new prompt for every request (no server finds a whole prompt in its cache)")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--prefill-runs", type=int, default=3, help="prompts per prefill server (median)")
    parser.add_argument("--prefill-shimmy-args", action="append", default=None,
                        help="`shimmy serve` arguments of one prefill row (repeatable; default: one, none)")
    parser.add_argument("--prefill-llama-args", action="append", default=None,
                        help="llama-server arguments of one prefill row (repeatable; default: one, none)")
    parser.add_argument("--repeat", type=int, default=1, help="run every server this many times, in turn")
    args = parser.parse_args()
    model = demo_model_path()
    model_id = model.name[: -len(".gguf")]
    counts = [int(n) for n in args.streams.split(",")]
    cores = os.cpu_count() or 1
    thread_sets = (args.thread_sets or ";".join(str(t) for t in range(1, cores + 1))).split(";")
    shimmy_sets = args.shimmy_args or [""]

    # Every server once per repeat, in turn, so that a slow spell of a shared machine falls on
    # all of them; each row is the median over the repeats.
    runs: dict[tuple[str, str], list[dict[int, dict]]] = {}
    for _ in range(0 if args.skip_decode else args.repeat):
        for flags in shimmy_sets:
            server = Server(model, "--parallel", str(SLOTS), "--ctx-size", str(CTX), *shlex.split(flags))
            try:
                runs.setdefault(("shimmy", flags), []).append(
                    decode_rows(server.base, model_id, counts, args.tokens, args.rounds, args.distinct_prompts))
            finally:
                server.stop()
        for threads in thread_sets:
            server = Server(model, command=llama_server_command(args.llama_server, model, threads, SLOTS, CTX))
            try:
                runs.setdefault(("llama", threads), []).append(
                    decode_rows(server.base, model_id, counts, args.tokens, args.rounds, args.distinct_prompts))
            finally:
                server.stop()
    pre: dict[str, list[dict]] = {}
    if not args.skip_prefill:
        ctx = max(4096, 1 << (args.prompt_tokens + 256).bit_length())
        for _ in range(args.repeat):
            for flags in args.prefill_shimmy_args or [""]:
                server = Server(model, "--ctx-size", str(ctx), *shlex.split(flags))
                try:
                    pre.setdefault(f"Shimmy --ctx-size {ctx} {flags}", []).append(
                        prefill(server, model_id, args.prompt_tokens, args.prefill_runs))
                finally:
                    server.stop()
            for flags in args.prefill_llama_args or [""]:
                server = Server(model, command=lambda port: [args.llama_server, "-m", str(model), "--host", "127.0.0.1",
                                                             "--port", str(port), "-c", str(ctx * 4), "--no-webui",
                                                             *shlex.split(flags)])
                try:
                    pre.setdefault(f"llama-server -c {ctx * 4} {flags}", []).append(
                        prefill(server, model_id, args.prompt_tokens, args.prefill_runs))
                finally:
                    server.stop()

    print(f"Machine: {platform.machine()}, {cores} logical cores, {platform.processor() or '?'}; "
          f"Python {platform.python_version()}; {model.name}; {args.tokens} tokens per stream, "
          f"{args.rounds} rounds per row; {SLOTS} slots of {CTX} tokens; every server {args.repeat} times in "
          f"turn, medians (min-max of the aggregate in the last table)\n")
    if runs:
        merged = {key: {n: median_row([rep[n] for rep in reps]) for n in counts} for key, reps in runs.items()}
        mine = {flags: merged[("shimmy", flags)] for flags in shimmy_sets}
        theirs = {threads: merged[("llama", threads)] for threads in thread_sets}
        ours = mine[shimmy_sets[0]]
        names = [f"Shimmy {flags or 'defaults'}" for flags in shimmy_sets]
        print("| streams | " + " | ".join(f"{name} tok/s | TTFT p50" for name in names) + " | "
              + " | ".join(f"llama-server -t {t} tok/s" for t in thread_sets) + " | best llama-server | TTFT p50 | ratio |")
        print("|---|" + "---|---|" * len(names) + "---|" * len(thread_sets) + "---|---|---|")
        for n in counts:
            best = max(thread_sets, key=lambda t: theirs[t][n]["aggregate"])
            b = theirs[best][n]
            o = ours[n]
            print(f"| {n} | " + " | ".join(f"{mine[f][n]['aggregate']:.1f} | {mine[f][n]['ttft_p50'] * 1000:.0f} ms"
                                          for f in shimmy_sets) + " | "
                  + " | ".join(f"{theirs[t][n]['aggregate']:.1f}" for t in thread_sets)
                  + f" | -t {best}: {b['aggregate']:.1f} | {b['ttft_p50'] * 1000:.0f} ms | "
                  f"**{o['aggregate'] / b['aggregate']:.2f}x** |")
        print("\n| streams | " + " | ".join(names + [f"llama-server -t {t}" for t in thread_sets]) + " |")
        print("|---|" + "---|" * (len(names) + len(thread_sets)))
        for n in counts:
            spreads = [mine[f][n]["spread"] for f in shimmy_sets] + [theirs[t][n]["spread"] for t in thread_sets]
            print(f"| {n} | " + " | ".join(f"{lo:.1f}-{hi:.1f}" for lo, hi in spreads) + " |")
        incomplete = [f"{name} {n}: {r['complete']}" for name, rows in [*mine.items(), *theirs.items()]
                      for n, r in rows.items() if r["complete"].split("/")[0] != r["complete"].split("/")[1]]
        print(f"\nIncomplete streams: {', '.join(incomplete) or 'none'}\n")

    if pre:
        print("| prefill, one prompt (defaults but for the context) | prompt tokens | TTFT, median | "
              "prompt tok/s, median | each start |")
        print("|---|---|---|---|---|")
        for name, reps in pre.items():
            rates = [r["rate"] for r in reps]
            print(f"| {name} | {reps[0]['prompt_tokens']} | {statistics.median(r['ttft'] for r in reps):.2f} s | "
                  f"{statistics.median(rates):.0f} | {', '.join(f'{x:.0f}' for x in rates)} |")
        ours_pre = next(v for k, v in pre.items() if k.startswith("Shimmy"))
        theirs_pre = next(v for k, v in pre.items() if k.startswith("llama-server"))
        ratio = statistics.median(r["rate"] for r in ours_pre) / statistics.median(r["rate"] for r in theirs_pre)
        print(f"\nPrefill ratio (first Shimmy / first llama-server, prompt tok/s): **{ratio:.2f}x**")


if __name__ == "__main__":
    main()
