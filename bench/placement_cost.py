"""What placing a new GGUF request costs the engine thread: ``Engine._place`` compares the
prompt with every slot's cells, under the engine lock, while every stream waits.

    .venv/bin/python bench/placement_cost.py [--slots 16] [--system 3000] [--history 500,20000]

Each slot holds the same system prompt and a chat of its own; the request is one slot's chat
and 50 new tokens.  No llama.cpp context: the engine's memory calls do nothing.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from types import SimpleNamespace

from shimmy_plugins.backends.gguf.gguf_engine import Engine, Slot, copy_worth


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--system", type=int, default=3000)
    parser.add_argument("--history", default="500,20000")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    rng = random.Random(1)
    system = [rng.randrange(50000) for _ in range(args.system)]
    print("| slots | system prompt | chat per slot | _place, median |\n|---|---|---|---|")
    for history in (int(h) for h in args.history.split(",")):
        chats = [system + [rng.randrange(50000) for _ in range(history)] for _ in range(args.slots)]
        times = []
        for run in range(args.runs):
            engine = object.__new__(Engine)  # the placement state only
            engine._llama = SimpleNamespace(llama_memory_seq_rm=lambda *a: None, llama_memory_seq_cp=lambda *a: None)
            engine._memory, engine._worth, engine._chunk = None, copy_worth(32768), 128
            engine._slots = [Slot(i, list(chat), used=i + 1) for i, chat in enumerate(chats)]
            prompt = chats[run % args.slots] + [rng.randrange(50000) for _ in range(50)]
            start = time.perf_counter()
            engine._place(prompt, list(engine._slots))
            times.append(time.perf_counter() - start)
        print(f"| {args.slots} | {args.system} | {history} | {statistics.median(times) * 1000:.2f} ms |")


if __name__ == "__main__":
    main()
