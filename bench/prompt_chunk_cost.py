"""What cutting prompts into fixed chunks costs: prompt tokens per second by chunk size.

    .venv/bin/python bench/prompt_chunk_cost.py [--model PATH] [--tokens 1000] [--rounds 3]

In-process, with the GGUF engine's context settings: one prompt of ``--tokens`` tokens
computed in chunks of 512, 256, 128 (the engine's PROMPT_CHUNK), 64 and 32 tokens, each
chunk in a ``llama_decode`` of its own; the best of ``--rounds``.
"""

from __future__ import annotations

import argparse
import time

from batch_invariance import Context
from common import demo_model_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="a GGUF file (default: the demo model)")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    c = Context(args.model or str(demo_model_path()), n_seq=4)
    tokens = c.tokenize("Tell me a long story about the sea. " * 400)[: args.tokens]
    print("| chunk | prompt tok/s |")
    print("|---|---|")
    for chunk in (512, 256, 128, 64, 32):
        best = float("inf")
        for _ in range(args.rounds):
            c.clear()
            t = time.perf_counter()
            for start in range(0, len(tokens), chunk):
                c.decode([(0, p, tokens[p]) for p in range(start, min(start + chunk, len(tokens)))])
            best = min(best, time.perf_counter() - t)
        print(f"| {chunk} | {len(tokens) / best:.0f} |")


if __name__ == "__main__":
    main()
