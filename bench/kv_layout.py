"""What the KV-cache layout and flash attention do on the CPU: memory, and the numbers a
greedy stream gets.

    .venv/bin/python bench/kv_layout.py [--steps 48] [--model PATH]

In-process on the demo model (or ``--model``), with the engine's context settings otherwise:
  - resident memory of a context of 4 slots, each in a fresh process: one KV stream per slot
    of 8192 and of 2048 cells, and one unified stream of 8192 cells shared by the 4 slots
    (llama.cpp's ``kv_unified``, what llama-server does);
  - a greedy stream alone against the same stream beside 1 to 3 others, with a unified
    cache (where its cells land depends on the others) and with one stream per slot;
  - greedy text with flash attention on against off, and with a q8_0 cache (which needs
    flash attention) against f16.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np

from batch_invariance import Context, greedy, QUESTIONS
from common import demo_model_path, rss_mb


def memory(path: str, n_ctx_seq: int, unified: bool) -> None:
    import os

    c = Context(path, n_seq=4, n_ctx_seq=n_ctx_seq, unified=unified)
    c.decode([(0, p, t) for p, t in enumerate(c.tokenize(QUESTIONS[0]))])
    print(json.dumps({"rss_mb": rss_mb(os.getpid())}))


PROMPTS = QUESTIONS + ["Write a story about a lighthouse keeper.", "Explain how a bicycle works.",
                       "List five fruits and their colors.", "What is 17 times 23?"]


def texts(c: Context, steps: int) -> tuple[list[list[int]], list[np.ndarray]]:
    out, logits = [], []
    for q in PROMPTS:
        seen = greedy(c, [c.tokenize(q)], steps)
        out.append([int(x.argmax()) for x in seen])
        logits.append(np.stack(seen))
    return out, logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--model")
    parser.add_argument("--memory", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true", help="leave out the resident-memory figures")
    parser.add_argument("--skip-layout", action="store_true", help="leave out unified against one stream per slot")
    args = parser.parse_args()
    path = args.model or str(demo_model_path())
    if args.memory:
        memory(path, int(args.memory[0]), args.memory[1] == "unified")
        return
    for n_ctx_seq, layout, label in () if args.skip_memory else ((8192, "split", "4 x 8192, one stream per slot"),
                                     (2048, "split", "4 x 2048, one stream per slot"),
                                     (2048, "unified", "8192 unified, shared by 4 slots")):
        out = subprocess.run([sys.executable, __file__, "--model", path, "--memory", str(n_ctx_seq), layout],
                             capture_output=True, text=True, check=True).stdout
        print(f"memory, {label}: RSS {json.loads(out.splitlines()[-1])['rss_mb']:.0f} MB")
    for unified in () if args.skip_layout else (True, False):
        print(f"... {'unified' if unified else 'one stream per slot'}", flush=True)
        c = Context(path, n_seq=4, n_ctx_seq=1024, unified=unified)
        prompts = [c.tokenize(q) for q in QUESTIONS]
        differ = total = diverged = 0
        for i in range(len(prompts)):
            others = prompts[:i] + prompts[i + 1:]
            alone = greedy(c, [prompts[i]], args.steps)
            for k in range(1, 4):
                # in a unified cache, its decoded tokens' cells interleave with the others'
                batched = greedy(c, [prompts[i], *others[:k]], args.steps)
                for a, b in zip(alone, batched):
                    total += 1
                    differ += bool(np.abs(a - b).max() > 0)
                diverged += any(a.argmax() != b.argmax() for a, b in zip(alone, batched))
        print(f"{'unified' if unified else 'one stream per slot'}: {differ} of {total} decoding steps differ "
              f"alone vs beside 1-3 others; greedy text diverges in {diverged} of {len(prompts) * 3} cases")
    import llama_cpp

    base, base_logits = texts(Context(path, n_seq=1), args.steps)
    for label, kwargs in (("flash attention on", {"flash": True}),
                          ("flash attention on, q8_0 K and V cache",
                           {"flash": True, "cache_types": (llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q8_0)}),
                          ("flash attention off, q8_0 K cache",
                           {"cache_types": (llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_F16)})):
        got, logits = texts(Context(path, n_seq=1, **kwargs), args.steps)
        same = sum(a == b for a, b in zip(base, got))
        first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(base, got)]
        worst = max(float(np.abs(a - b).max()) for a, b in zip(base_logits, logits))
        print(f"{label}: greedy text identical to the default for {same} of {len(base)} prompts "
              f"(first differing step: {first}); largest |logit difference| {worst:.3f}")


if __name__ == "__main__":
    main()
