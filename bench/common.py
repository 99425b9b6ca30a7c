"""What the benchmarks share: a real `shimmy serve` on a free port, its memory,
and the in-process llama-cpp-python baseline with the server's thread settings."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shimmy_plugins.backends.gguf.gguf_backend import engine_threads  # noqa: E402
from shimmy_plugins.sources.local_files import demo_model_path  # noqa: E402,F401  (re-exported)

EOS_ID = 2  # SmolLM2's <|im_end|>: banned with logit_bias so every run generates the same length
NO_CACHE = {"Cache-Control": "no-cache"}  # measure generation, not the response cache (also --no-cache)
STORY_PROMPT = b"<|im_start|>user\nWrite a story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """`shimmy serve --model MODEL` in a subprocess with its own SHIMMY_HOME; ``ready_s`` is
    the time from start to the first 200 on /health.  ``command(port)``, when given, starts
    another OpenAI-compatible server instead (llama.cpp's llama-server, to compare)."""

    def __init__(self, model: Path, *args: str, command=None, **env: str):
        self.port = free_port()
        self.home = tempfile.TemporaryDirectory()
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            command(self.port) if command else
            [sys.executable, "-m", "shimmy_core", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--model", str(model), "--no-demo", "--no-cache", *args],
            env={**os.environ, "SHIMMY_HOME": self.home.name, **env},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        while True:
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if self.proc.poll() is not None:
                    raise RuntimeError("the server exited") from None
                time.sleep(0.005)
        self.ready_s = time.perf_counter() - started

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.home.cleanup()


def in_process_rate(model: Path, tokens: int, runs: int = 3) -> float:
    """Single-stream greedy decode tokens/s of bare llama-cpp-python (the engine's own limit)."""
    import llama_cpp
    from llama_cpp._internals import LlamaSampler

    threads, batch_threads = engine_threads()
    llm = llama_cpp.Llama(str(model), n_ctx=2048, n_threads=threads, n_threads_batch=batch_threads,
                          verbose=False)
    prompt = llm.tokenize(STORY_PROMPT, special=True)
    rates = []
    for _ in range(runs):
        llm.reset()
        llm.eval(prompt)
        sampler = LlamaSampler()
        sampler.add_logit_bias(llm.n_vocab(), {EOS_ID: -100.0})
        sampler.add_greedy()
        token = sampler.sample(llm._ctx, -1)  # the first token belongs to prompt processing
        start = time.perf_counter()
        for _ in range(tokens - 1):
            llm.eval([token])
            token = sampler.sample(llm._ctx, -1)
        rates.append((tokens - 1) / (time.perf_counter() - start))
    llm.close()
    return statistics.median(rates)
