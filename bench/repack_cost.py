"""What ``--batch-invariant`` costs: llama.cpp's repacked weights against unrepacked ones.

    .venv/bin/python bench/repack_cost.py --model PATH [--prompt 512] [--steps 64] [--rounds 3]

In-process, with the GGUF engine's context settings, one model load per setting: prompt
processing of ``--prompt`` tokens in one batch, then greedy decoding of ``--steps`` tokens
for 1 and for 4 sequences sharing every step.  Prints tokens per second (median of the
rounds) and the unrepacked/repacked ratio.  Only weight types that llama.cpp repacks on
this CPU (Q4_0, Q4_K, IQ4_NL, MXFP4 with AVX2) can differ.
"""

from __future__ import annotations

import argparse
import statistics
import time

from batch_invariance import Context


def rates(c: Context, n_prompt: int, steps: int, rounds: int) -> dict[str, float]:
    prompt = (c.tokenize("Tell me a long story about the sea. " * 200) * 2)[:n_prompt]
    out: dict[str, list[float]] = {"prompt": [], "decode x1": [], "decode x4": []}
    for _ in range(rounds):
        c.clear()
        t = time.perf_counter()
        c.decode([(0, p, tok) for p, tok in enumerate(prompt)])
        out["prompt"].append(n_prompt / (time.perf_counter() - t))
        for width in (1, 4):
            c.clear()
            for seq in range(width):
                c.decode([(seq, p, tok) for p, tok in enumerate(prompt[:32])])
            t = time.perf_counter()
            for step in range(steps):
                c.decode([(seq, 32 + step, prompt[step]) for seq in range(width)])
            out[f"decode x{width}"].append(width * steps / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = {}
    for repack in (True, False):
        c = Context(args.model, n_seq=4, repack=repack)
        results[repack] = rates(c, args.prompt, args.steps, args.rounds)
        del c
    print("| tok/s | repacked (default) | unrepacked (--batch-invariant) | ratio |")
    print("|---|---|---|---|")
    for key in results[True]:
        a, b = results[True][key], results[False][key]
        print(f"| {key} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
