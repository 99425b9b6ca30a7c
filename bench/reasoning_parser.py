"""What keeping reasoning apart costs per token: the reasoning parser against none.

    .venv/bin/python bench/reasoning_parser.py [--tokens 20000] [--rounds 5]

In-process, no model: the text of a thinking model's answer (a thought of ``--tokens`` pieces, the
close marker split across pieces, then an answer of as many) cut into the pieces a tokenizer
makes (words with their leading space), fed to :class:`shimmy_core.reasoning.ReasoningParser`
one piece at a time as the service does, and through :func:`split_reasoning` as a run's chunks.
The best of ``--rounds``; the cost per token is what a token of a thinking model's stream pays.
"""

from __future__ import annotations

import argparse
import time

from shimmy_core.contract.generation import TextDelta
from shimmy_core.reasoning import THINK, ReasoningParser, split_reasoning

WORDS = "the sea is wide and the ships go far , but we stay near the shore to think\n".split(" ")


def pieces(n: int) -> list[str]:
    thought = [" " + WORDS[i % len(WORDS)] for i in range(n)]
    answer = [" " + WORDS[(i * 7) % len(WORDS)] for i in range(n)]
    return thought + ["\n</", "think", ">\n\n"] + answer


def best(rounds: int, run) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=20000, help="pieces of thought (and as many of answer)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    feed = pieces(args.tokens)
    n = len(feed)

    def bare() -> None:
        for _ in ((0, TextDelta(p)) for p in feed):
            pass

    def parse() -> None:
        p = ReasoningParser(THINK, thinking=True)
        for piece in feed:
            p.feed(piece)
        p.finish()

    def stream() -> None:
        for _ in split_reasoning(((0, TextDelta(p)) for p in feed), {0: ReasoningParser(THINK, True)}):
            pass

    base = best(args.rounds, bare)
    print(f"{n} pieces, best of {args.rounds}")
    print("| path | µs per token | over no parser |")
    print("|---|---|---|")
    print(f"| chunks, no parser | {base / n * 1e6:.2f} | |")
    for name, run in (("ReasoningParser.feed", parse), ("split_reasoning (the service's path)", stream)):
        t = best(args.rounds, run)
        print(f"| {name} | {t / n * 1e6:.2f} | +{(t - base) / n * 1e6:.2f} |")


if __name__ == "__main__":
    main()
