"""How far llama.cpp's numbers for one sequence depend on how its tokens were batched.

    .venv/bin/python bench/batch_invariance.py [--max-len 120] [--steps 32]

In-process, with the GGUF engine's context settings (one KV stream per sequence, flash
attention off, the server's threads), on the demo model:
  - prefix reuse: for each prompt length, the last token's logits when the prompt is
    processed in one batch against when all but its last token come from the cache;
  - batching: a prompt's greedy decode alone (one token per step) against the same decode
    while three other sequences share every step (four tokens per step).
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
    def __init__(self, path: str, n_seq: int):
        import llama_cpp
        from llama_cpp._internals import LlamaContext, LlamaModel
        from llama_cpp._logger import set_verbose

        set_verbose(False)
        self.llama = llama_cpp
        self.model = LlamaModel(path_model=path, params=llama_cpp.llama_model_default_params(), verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = 1024 * n_seq, n_seq, False
        params.n_threads, params.n_threads_batch = engine_threads()
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
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


def prefix_reuse(c: Context, max_len: int) -> tuple[int, int, float, int]:
    tokens = c.tokenize("Here is a list of the birds I saw this spring: " +
                        ", ".join(f"bird {i}" for i in range(60)) + ". Which one came first?")
    differ = flips = 0
    worst = 0.0
    lengths = range(2, min(max_len, len(tokens)) + 1)
    for n in lengths:
        c.clear()
        [whole] = c.decode([(0, p, t) for p, t in enumerate(tokens[:n])])
        c.llama.llama_memory_seq_rm(c.memory, 0, n - 1, -1)
        [reused] = c.decode([(0, n - 1, tokens[n - 1])])
        d = float(np.abs(whole - reused).max())
        differ += d > 0
        flips += int(whole.argmax() != reused.argmax())
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
    args = parser.parse_args()
    c = Context(str(demo_model_path()), n_seq=4)
    total, differ, worst, flips = prefix_reuse(c, args.max_len)
    print(f"prefix reuse: {differ} of {total} prompt lengths differ; largest |logit difference| {worst:.3f}; "
          f"greedy token changed at {flips}")
    prompts = [c.tokenize(q) for q in QUESTIONS]
    for q, others in ((QUESTIONS[i], prompts[:i] + prompts[i + 1:]) for i in range(len(prompts))):
        mine = c.tokenize(q)
        alone = greedy(c, [mine], args.steps)
        batched = greedy(c, [mine, *others], args.steps)
        diffs = [float(np.abs(a - b).max()) for a, b in zip(alone, batched)]
        same = next((i for i, (a, b) in enumerate(zip(alone, batched)) if a.argmax() != b.argmax()), None)
        print(f"batching, {q!r}: {sum(d > 0 for d in diffs)} of {args.steps} steps differ; largest "
              f"{max(diffs):.3f}; greedy text {'identical' if same is None else f'diverges at step {same}'}")


if __name__ == "__main__":
    main()
