"""The engine's greedy pick (numpy) against llama.cpp's own chain of a logit bias and greedy."""

from __future__ import annotations

import types

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from shimmy_plugins.backends.gguf.gguf_engine import Engine, Greedy  # noqa: E402


def llama_greedy(logits: np.ndarray, bias: list[tuple[int, float]]) -> int:
    """What llama.cpp's sampler chain picks from these logits (the engine's stored-logits path,
    which hands llama.cpp the candidate array ``llama_sampler_sample`` would build)."""
    from llama_cpp._internals import LlamaSampler

    sampler = LlamaSampler()
    if bias:
        sampler.add_logit_bias(len(logits), dict(bias))
    sampler.add_greedy()
    return Engine._sample_stored(types.SimpleNamespace(_llama=llama_cpp), sampler, logits)


def test_the_greedy_pick_is_llama_cpps():
    rng = np.random.default_rng(7)
    n_vocab = 2048
    for case in range(300):
        logits = rng.normal(0, 3, n_vocab).astype(np.float32)
        if case % 3 == 0:   # ties: the first of the highest wins
            top = logits.max()
            logits[rng.choice(n_vocab, 4, replace=False)] = top
        bias = [(int(t), float(b)) for t, b in zip(rng.choice(n_vocab, case % 5, replace=False),
                                                     rng.uniform(-100, 100, case % 5))]
        if case % 7 == 0:   # a bias that makes a tie with the best
            best = int(logits.argmax())
            other = (best + 1) % n_vocab
            bias = [(other, float(np.float32(logits[best]) - np.float32(logits[other])))]
        if case % 11 == 0:  # tokens outside the vocabulary are ignored, as llama.cpp does
            bias.append((n_vocab + 5, 50.0))
        before = logits.copy()
        assert Greedy(bias, n_vocab).pick(logits) == llama_greedy(logits.copy(), bias), case
        assert np.array_equal(logits, before)  # llama.cpp's buffer is left as it was
