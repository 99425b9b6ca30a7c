"""How far llama.cpp's numbers for one sequence depend on how its tokens were batched.

    .venv/bin/python bench/batch_invariance.py [--max-len 120] [--steps 32] [--model PATH] [--no-repack]

In-process, with the GGUF engine's context settings (one KV stream per sequence, flash
attention off, the server's threads), on the demo model or ``--model``:
  - prefix reuse: for each prompt length, the last token's logits when the prompt is
    processed in one batch against when all but its last token (what the engine once did)
    or its last two (the default) come from the cache, and, as ``--batch-invariant`` does,
    the prompt cut at multiples of 128 tokens, fresh against whole chunks from the cache (left
    there by a longer prompt);
  - batching: a prompt's greedy decode alone (one token per step) against the same decode
    while one, two or three other sequences share every step.
``--no-repack`` loads the weights as ``shimmy serve --batch-invariant`` does.
Prints how many cases differ at all, the largest difference, and how many change the
greedy token.  A test of the engine cannot promise more than this.
"""

from __future__ import annotations

import argparse

import numpy as np

from common import demo_model_path, engine_threads

QUESTIONS = ["Name three colors.", "Write a haiku about rain.", "What is the capital of Italy?",
             "Give me a tip for sleeping well."]


class Context:
    def __init__(self, path: str, n_seq: int, repack: bool = True, *, n_ctx_seq: int = 1024,
                 unified: bool = False, flash: bool = False, cache_types: tuple[int, int] | None = None):
        import llama_cpp
        from llama_cpp._internals import LlamaContext, LlamaModel
        from llama_cpp._logger import set_verbose

        set_verbose(False)
        self.llama = llama_cpp
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = repack
        self.model = LlamaModel(path_model=path, params=mparams, verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = n_ctx_seq * n_seq, n_seq, unified
        params.n_batch = params.n_ubatch = 512
        params.n_threads, params.n_threads_batch = engine_threads()
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        if cache_types:
            params.type_k, params.type_v = cache_types
        self.ctx = LlamaContext(model=self.model, params=params, verbose=False)
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.batch = llama_cpp.llama_batch_init(1024, 0, 1)
        self.n_vocab = self.model.n_vocab()

    def tokenize(self, question: str) -> list[int]:
        text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        return self.model.tokenize(text.encode(), add_bos=False, special=True)

    def decode(self, items: list[tuple[int, int, int]]) -> list[np.ndarray]:
        """``items``: (sequence, position, token); the logits of each sequence's last item, by sequence."""
        last = {seq: i for i, (seq, _, _) in enumerate(items)}
        for i, (seq, pos, token) in enumerate(items):
            self.batch.token[i], self.batch.pos[i], self.batch.n_seq_id[i] = token, pos, 1
            self.batch.seq_id[i][0], self.batch.logits[i] = seq, i in last.values()
        self.batch.n_tokens = len(items)
        assert self.llama.llama_decode(self.ctx.ctx, self.batch) == 0
        return [np.ctypeslib.as_array(self.llama.llama_get_logits_ith(self.ctx.ctx, last[seq]),
                                      shape=(self.n_vocab,)).copy() for seq in sorted(last)]

    def clear(self) -> None:
        self.llama.llama_memory_clear(self.memory, True)


def birds(c: Context) -> list[int]:
    return c.tokenize("Here is a list of the birds I saw this spring: " +
                      ", ".join(f"bird {i}" for i in range(150)) + ". Which one came first?")


def prefix_reuse(c: Context, max_len: int, recompute: int) -> tuple[int, int, float, int]:
    """The whole prompt in one batch against all but its last ``recompute`` tokens from the
    cache and those computed in a batch of their own (1: what the engine once did; 2: what it
    does by default)."""
    tokens = birds(c)
    differ = flips = 0
    worst = 0.0
    lengths = range(recompute + 1, min(max_len, len(tokens)) + 1)
    for n in lengths:
        c.clear()
        [whole] = c.decode([(0, p, t) for p, t in enumerate(tokens[:n])])
        c.llama.llama_memory_seq_rm(c.memory, 0, n - recompute, -1)
        [reused] = c.decode([(0, p, tokens[p]) for p in range(n - recompute, n)])
        d = float(np.abs(whole - reused).max())
        differ += d > 0
        flips += int(whole.argmax() != reused.argmax())
        worst = max(worst, d)
    return len(lengths), differ, worst, flips


def in_chunks(c: Context, tokens: list[int], start: int, chunk: int) -> np.ndarray:
    """The engine's way: positions from ``start`` on, cut at multiples of ``chunk``, each
    chunk in a batch of its own; the last token's logits."""
    pos = start
    while pos < len(tokens):
        end = min(len(tokens), (pos // chunk + 1) * chunk)
        [last] = c.decode([(0, p, tokens[p]) for p in range(pos, end)])
        pos = end
    return last


def chunked_reuse(c: Context, lengths: range, chunk: int) -> tuple[int, int, float, int]:
    """The engine's way, fresh against cached: whole chunks left in the cache by a longer
    prompt (40 more tokens), the rest computed again."""
    tokens = birds(c)
    differ = flips = 0
    worst = 0.0
    for n in lengths:
        c.clear()
        fresh = in_chunks(c, tokens[:n], 0, chunk)
        c.clear()
        in_chunks(c, tokens[:n + 40], 0, chunk)
        keep = (n - 1) // chunk * chunk
        c.llama.llama_memory_seq_rm(c.memory, 0, keep, -1)
        cached = in_chunks(c, tokens[:n], keep, chunk)
        d = float(np.abs(fresh - cached).max())
        differ += d > 0
        flips += int(fresh.argmax() != cached.argmax())
        worst = max(worst, d)
    return len(lengths), differ, worst, flips


def greedy(c: Context, prompts: list[list[int]], steps: int) -> list[np.ndarray]:
    """Greedy decode of every prompt together (one token each per step); the logits of the first."""
    c.clear()
    # each prompt in a batch of its own, as the engine prefills a prompt that arrives alone
    last = [c.decode([(seq, p, t) for p, t in enumerate(prompt)])[0] for seq, prompt in enumerate(prompts)]
    seen = []
    positions = [len(p) for p in prompts]
    tokens = [int(logits.argmax()) for logits in last]
    for _ in range(steps):
        out = c.decode([(seq, positions[seq], tokens[seq]) for seq in range(len(prompts))])
        seen.append(out[0])
        positions = [p + 1 for p in positions]
        tokens = [int(logits.argmax()) for logits in out]
    return seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-len", type=int, default=120)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--model", help="a GGUF file (default: the demo model)")
    parser.add_argument("--no-repack", dest="repack", action="store_false",
                        help="load the weights unrepacked, as --batch-invariant does")
    args = parser.parse_args()
    c = Context(args.model or str(demo_model_path()), n_seq=4, repack=args.repack)
    for recompute, what in ((1, "last token alone"), (2, "last two recomputed (the default)")):
        total, differ, worst, flips = prefix_reuse(c, args.max_len, recompute)
        print(f"prefix reuse, {what}: {differ} of {total} prompt lengths differ; largest |logit "
              f"difference| {worst:.3f}; greedy token changed at {flips}")
    total, differ, worst, flips = chunked_reuse(c, range(130, 130 + args.max_len), 128)
    print(f"prefix reuse, whole 128-token chunks (--batch-invariant): {differ} of {total} prompt lengths differ; "
          f"largest |logit difference| {worst:.3f}; greedy token changed at {flips}")
    prompts = [c.tokenize(q) for q in QUESTIONS]
    for q, others in ((QUESTIONS[i], prompts[:i] + prompts[i + 1:]) for i in range(len(prompts))):
        mine = c.tokenize(q)
        alone = greedy(c, [mine], args.steps)
        for k in range(1, len(others) + 1):
            batched = greedy(c, [mine, *others[:k]], args.steps)
            diffs = [float(np.abs(a - b).max()) for a, b in zip(alone, batched)]
            same = next((i for i, (a, b) in enumerate(zip(alone, batched)) if a.argmax() != b.argmax()), None)
            print(f"batching, {q!r} with {k} other(s): {sum(d > 0 for d in diffs)} of {args.steps} steps differ; "
                  f"largest {max(diffs):.3f}; greedy text {'identical' if same is None else f'diverges at step {same}'}")


if __name__ == "__main__":
    main()
