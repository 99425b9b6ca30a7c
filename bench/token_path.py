"""Where a generated token's CPU time goes in ``shimmy serve``: llama.cpp, the engine's Python,
and the HTTP side (dialect, JSON, waitress), in microseconds per token, per stream count.

    .venv/bin/python bench/token_path.py [--streams 1,8] [--tokens 128] [--rounds 2] [-- SERVE ARGS]

The server is a real ``shimmy serve`` in a subprocess, started through this file (``--serve``):
it wraps llama.cpp's decode, sample and detokenize calls and the engine's step with per-thread
CPU clocks, and writes its counters to a file on SIGUSR1 (then starts them again).  The clients
(openai SDK, streaming, in this process) are not counted.  Per token:

- ``llama`` is the CPU inside llama.cpp's calls on the engine thread (with one decode thread,
  all of llama.cpp's work; with more, its other threads land in ``rest``);
- ``engine py`` is the engine thread's CPU in a step outside those calls (scheduling, sampler
  setup, the stop scan, chunk objects, the sinks);
- ``rest`` is the rest of the process: request threads (dialect, JSON), waitress, the GC.

Run it with ``--threads 1`` (the default on 2 cores) for a clean split.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def serve(counters_path: str, argv: list[str]) -> None:
    """``shimmy serve ARGV`` with the counters (the subprocess side)."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    from shimmy_plugins.backends.gguf import gguf_engine

    totals = {"llama": 0.0, "step": 0.0, "steps": 0, "decodes": 0}
    clock = time.thread_time

    def timed(fn):
        def call(*args):
            start = clock()
            try:
                return fn(*args)
            finally:
                totals["llama"] += clock() - start
        return call

    for module in (llama_cpp, low):
        for name in ("llama_decode", "llama_sampler_sample", "llama_token_to_piece", "llama_vocab_is_eog"):
            setattr(module, name, timed(getattr(low, name)))
    step = gguf_engine.Engine._step

    def counted_step(self, active):
        start = clock()
        try:
            return step(self, active)
        finally:
            totals["step"] += clock() - start
            totals["steps"] += 1

    gguf_engine.Engine._step = counted_step
    process_start = [time.process_time()]

    def dump(*_):
        now = time.process_time()
        Path(counters_path).write_text(json.dumps({**totals, "process": now - process_start[0]}))
        for key in totals:
            totals[key] = 0
        process_start[0] = now

    signal.signal(signal.SIGUSR1, dump)
    from shimmy_core.cli import main as shimmy_main

    sys.exit(shimmy_main(["serve", *argv]))


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from batching_bench import concurrent_streams
    from common import Server, demo_model_path

    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("serve_args", nargs="*", help="after --: more `shimmy serve` arguments")
    args = parser.parse_args()
    model = demo_model_path()
    model_id = model.name[: -len(".gguf")]
    counts = [int(n) for n in args.streams.split(",")]
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    server = Server(model, "--parallel", str(max(counts)), "--ctx-size", "1024", *args.serve_args,
                    command=lambda port: [sys.executable, __file__, "--serve", out, "--host", "127.0.0.1",
                                          "--port", str(port), "--model", str(model), "--no-demo", "--no-cache",
                                          "--parallel", str(max(counts)), "--ctx-size", "1024", *args.serve_args])
    rows = []
    try:
        concurrent_streams(server.base, model_id, max(counts), 8)   # load, warm every slot
        for n in counts:
            samples = []
            for _ in range(args.rounds):
                server.proc.send_signal(signal.SIGUSR1)
                time.sleep(0.3)
                result = concurrent_streams(server.base, model_id, n, args.tokens, 1)
                server.proc.send_signal(signal.SIGUSR1)
                time.sleep(0.3)
                c = json.loads(Path(out).read_text())
                tokens = n * args.tokens
                samples.append({"aggregate": result["aggregate"], "llama": c["llama"] / tokens * 1e6,
                                "engine": (c["step"] - c["llama"]) / tokens * 1e6,
                                "rest": (c["process"] - c["step"]) / tokens * 1e6,
                                "total": c["process"] / tokens * 1e6, "complete": result["complete"]})
            rows.append((n, {k: statistics.median(s[k] for s in samples) if k != "complete" else
                             ",".join(s[k] for s in samples) for k in samples[0]}))
    finally:
        server.stop()
        os.unlink(out)
    print(f"`shimmy serve {' '.join(args.serve_args)}`, {args.tokens} tokens per stream, median of {args.rounds}:\n")
    print("| streams | tok/s | CPU us/token | llama.cpp | engine Python | HTTP side and rest | complete |")
    print("|---|---|---|---|---|---|---|")
    for n, r in rows:
        print(f"| {n} | {r['aggregate']:.1f} | {r['total']:.0f} | {r['llama']:.0f} | {r['engine']:.0f} | "
              f"{r['rest']:.0f} | {r['complete']} |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        serve(sys.argv[2], sys.argv[3:])
    else:
        main()
