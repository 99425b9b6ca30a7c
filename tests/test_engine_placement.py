"""Which slot a new GGUF request gets and what its KV cells start with: the placement rule
of plugins/backends/gguf/gguf_engine.py as a unit, over a recorder instead of llama.cpp.  That the
copied cells give the same text is proven on the real model in test_batching.py."""

from __future__ import annotations

import collections
import random
import threading

from shimmy_core.plugin_api import PreparedPrompt
from shimmy_plugins.backends.gguf.gguf_engine import (
    KV_PAD,
    aligned_take,
    Engine, Job, Sink, Slot, chunk_end, common_prefix, copy_worth, prompt_take, reusable, stream_runs,
)


class Recorder:
    """Stands in for the three llama.cpp memory calls the placement makes."""

    def __init__(self):
        self.calls = []

    def llama_memory_seq_rm(self, memory, seq, p0, p1):
        self.calls.append(("rm", seq, p0, p1))

    def llama_memory_seq_cp(self, memory, src, dst, p0, p1):
        self.calls.append(("cp", src, dst, p0, p1))


def engine(slots: list[list[int]], busy: set[int] = frozenset(), n_ctx_seq: int = 8192) -> Engine:
    e = object.__new__(Engine)  # no llama.cpp context: only the placement state
    e._llama, e._memory, e._worth, e._chunk = Recorder(), None, copy_worth(n_ctx_seq), 16
    e._slots = [Slot(i, list(tokens)) for i, tokens in enumerate(slots)]
    for i in busy:
        e._slots[i].job = object.__new__(Job)
    return e


def place(e: Engine, prompt: list[int], exact: bool = False) -> tuple[int, int]:
    slot, keep = e._place(prompt, [s for s in e._slots if s.job is None], exact=exact)
    return slot.seq, keep


SYSTEM = list(range(100, 140))  # a 40-token system prompt


def test_the_lowest_free_slot_when_none_holds_more():
    e = engine([[], [], [], []], busy={0})
    assert place(e, [1, 2, 3]) == (1, 0)
    assert e._llama.calls == [("rm", 1, 0, -1)]


def test_a_slot_holding_the_prompt_wins_over_a_lower_one():
    e = engine([[7, 7], [], SYSTEM + [1, 2], []])
    assert place(e, SYSTEM + [1, 2, 3]) == (2, 41)  # all but the last two prompt tokens
    assert e._slots[2].tokens == SYSTEM + [1]


def test_next_to_a_busy_slot_the_prefix_moves_instead_of_the_sequence():
    e = engine([[8, 8], [], SYSTEM + [1], []], busy={0})
    assert place(e, SYSTEM + [1, 2, 3]) == (1, 41)  # slot 1 keeps the busy range at 0..1
    assert e._llama.calls == [("rm", 1, -1, -1), ("cp", 2, 1, -1, -1), ("rm", 1, 41, -1)]
    assert e._slots[2].tokens == SYSTEM + [1]


def test_a_few_tokens_are_recomputed_rather_than_copied():
    e = engine([[8, 8], SYSTEM[:37], SYSTEM, []], busy={0})
    assert place(e, SYSTEM + [5]) == (1, 37)  # 3 tokens: less than a copy of 8192 cells costs
    assert e._llama.calls == [("rm", 1, 37, -1)]


def test_an_idle_chats_history_outlives_an_unrelated_request():
    history = SYSTEM + list(range(200, 400))
    e = engine([history, [], [], []])
    assert place(e, SYSTEM[:5] + [1, 2]) == (1, 0)  # not slot 0: it would lose 200 tokens
    assert e._slots[0].tokens == history
    assert place(e, history + [7, 8]) == (0, 240)  # the next turn finds it


def test_a_busy_slots_prefix_is_copied_into_the_lowest_free_one():
    e = engine([SYSTEM + [9, 9, 9], [4, 4], [], []], busy={0})
    assert place(e, SYSTEM + [1, 2]) == (1, 40)  # two cached tokens are no history to keep
    assert e._llama.calls == [("rm", 1, -1, -1), ("cp", 0, 1, -1, -1), ("rm", 1, 40, -1)]
    assert e._slots[1].tokens == SYSTEM
    assert e._slots[0].tokens == SYSTEM + [9, 9, 9]  # the donor keeps what it has


def test_when_every_free_slot_holds_a_history_the_least_recently_used_goes():
    long_a, long_b = SYSTEM + list(range(200, 500)), SYSTEM + list(range(600, 750))
    e = engine([SYSTEM + [9], long_a, long_b], busy={0})
    e._slots[1].used, e._slots[2].used = 3, 7
    assert place(e, SYSTEM + [1, 2]) == (1, 40)  # slot 1 served longer ago


def test_no_copy_when_it_costs_more_than_it_saves():
    e = engine([SYSTEM[:10], [], []], busy={0})
    assert place(e, SYSTEM[:10] + [1, 2]) == (1, 0)  # 10 tokens < 16 at 8192 cells per slot
    e = engine([SYSTEM[:10], [], []], busy={0}, n_ctx_seq=1024)
    assert place(e, SYSTEM[:10] + [1, 2]) == (1, 10)  # worth it with small slots


def test_the_last_two_prompt_tokens_are_always_decoded():
    e = engine([SYSTEM, [], []], busy={0})
    assert place(e, SYSTEM) == (1, 38)
    e = engine([SYSTEM, []])
    assert place(e, SYSTEM) == (0, 38)
    assert e._llama.calls == [("rm", 0, 38, -1)] and e._slots[0].tokens == SYSTEM[:38]
    assert place(engine([[5], []]), [5]) == (0, 0)  # a one-token prompt is computed whole


def test_no_prompt_token_is_computed_alone():
    """A prompt's tokens go through llama.cpp two or more at a time (a one-token prompt aside)."""
    for remaining in range(1, 40):
        for budget in range(1, 40):
            take = prompt_take(remaining, budget)
            assert 0 <= take <= min(remaining, budget)
            assert take != 1 or remaining == 1
            assert remaining - take != 1
    assert prompt_take(600, 512) == 512 and prompt_take(513, 512) == 511 and prompt_take(129, 128) == 127


# ------------------------------------------------------------------ exact requests (greedy, seeded)
def test_prompts_are_cut_at_fixed_positions():
    assert [chunk_end(p, 40, 16) for p in (0, 5, 16, 31, 32, 39)] == [16, 16, 32, 32, 40, 40]
    assert chunk_end(0, 3, 16) == 3


def test_what_an_exact_request_may_reuse():
    # by default every agreeing cell but the last two prompt tokens
    assert reusable(common=50, canon=0, n_prompt=60, exact=False, chunk=16) == 50
    assert reusable(common=60, canon=0, n_prompt=60, exact=False, chunk=16) == 58
    assert reusable(common=1, canon=0, n_prompt=1, exact=False, chunk=16) == 0
    assert reusable(common=60, canon=0, n_prompt=60, exact=False, chunk=16, stored=60) == 60  # logits kept
    assert reusable(common=60, canon=0, n_prompt=60, exact=False, chunk=16, stored=62) == 58
    assert reusable(common=59, canon=0, n_prompt=60, exact=False, chunk=16, stored=60) == 58
    # whole chunks only for an exact request (--batch-invariant): what a fresh prompt computes the same way
    assert reusable(common=50, canon=48, n_prompt=60, exact=True, chunk=16) == 48
    assert reusable(common=50, canon=20, n_prompt=60, exact=True, chunk=16) == 16
    assert reusable(common=60, canon=64, n_prompt=60, exact=True, chunk=16) == 48
    assert reusable(common=64, canon=64, n_prompt=64, exact=True, chunk=16) == 48  # its last chunk again
    assert reusable(common=5, canon=64, n_prompt=64, exact=True, chunk=16) == 0


def test_an_exact_request_takes_whole_chunks_and_no_generated_cells():
    history = SYSTEM + [1, 2, 3]         # 43 cells: 32 of them in whole chunks, then generated ones
    e = engine([history, [], []])
    e._slots[0].canon = 32
    assert place(e, history + [4, 5], exact=True) == (0, 32)
    assert e._slots[0].tokens == history[:32] and e._slots[0].canon == 32
    e = engine([history, [], []])
    e._slots[0].canon = 32
    assert place(e, history + [4, 5]) == (0, 43)  # otherwise all of them


def test_a_copy_carries_how_much_of_the_donor_is_whole_chunks():
    e = engine([SYSTEM + [9] * 30, [], []], busy={0}, n_ctx_seq=1024)
    e._slots[0].canon = 64
    assert place(e, SYSTEM + [9] * 30 + [1], exact=True) == (1, 64)
    assert e._slots[1].canon == 64 and e._slots[1].tokens == (SYSTEM + [9] * 30)[:64]


def test_prompts_sharing_a_batch_take_the_same_number_of_tokens_each():
    from shimmy_plugins.backends.gguf.gguf_engine import equal_take

    assert equal_take([10, 30, 12], 64) == 10            # the shortest whole
    assert equal_take([10, 30, 11], 64) == 8             # 10 and 9 would leave a lone token
    assert equal_take([40, 50], 16) == 16                # the budget's share
    assert equal_take([3, 30], 64) == 3 and equal_take([2, 9], 1) == 0
    assert equal_take([3, 4], 64) == 0 and equal_take([3, 5], 64) == 3   # 3 or 2 would leave a lone token
    assert equal_take([2, 3, 4, 5], 64) == 0             # none fits: they go one batch each
    for remaining in ([5, 6, 7], [100, 101], [7, 9, 30]):
        take = equal_take(remaining, 64)
        assert take >= 2 and all(r - take != 1 for r in remaining)


def test_stream_runs_counts_the_passes_llama_cpp_makes():
    assert stream_runs([0, 1, 2, 3]) == 1
    assert stream_runs([3, 1, 0, 4]) == 2
    assert stream_runs([0, 2, 4, 6]) == 4
    assert stream_runs([]) == 0


def test_a_history_in_the_way_moves_to_the_least_recently_used_slot():
    long_a, long_b = SYSTEM + list(range(200, 500)), SYSTEM + list(range(600, 750))
    e = engine([SYSTEM + [9], long_a, long_b], busy={0})
    e._slots[1].used, e._slots[2].used = 7, 3
    # slot 2 served longer ago and goes, but slot 1 keeps the busy slots in one run: slot 1's
    # history moves to slot 2, and the request takes slot 1
    assert place(e, SYSTEM + [1, 2]) == (1, 40)
    assert e._slots[2].tokens == long_a and e._slots[2].used == 7
    assert ("cp", 1, 2, -1, -1) in e._llama.calls
    assert e._slots[1].tokens == SYSTEM


def test_an_empty_slot_in_the_way_is_simply_taken():
    e = engine([SYSTEM + [9], [], SYSTEM + [5, 5]], busy={0})
    e._slots[2].used = 1
    assert place(e, [1, 2, 3]) == (1, 0)
    assert not any(call[0] == "cp" for call in e._llama.calls)


def test_a_slot_holding_the_prompt_is_not_moved_for_a_whole_run():
    history = SYSTEM + list(range(200, 400))
    e = engine([[8, 8], SYSTEM + list(range(600, 750)), history], busy={0})
    assert place(e, history + [7, 8]) == (2, 240)  # its own cells beat a run split
    assert not any(call[0] == "cp" for call in e._llama.calls)


def generating(e: Engine, seq: int) -> Job:
    """Make slot ``seq`` run a job whose prompt is all in (a generating sequence)."""
    job = object.__new__(Job)
    job.sink, job.follow, job.fed, job.prepared = Sink(lambda: None), None, 0, PreparedPrompt("", (), 1)
    job.slot, e._slots[seq].job = e._slots[seq], job
    return job


def gapped(slots: list[list[int]], running: list[int]) -> tuple[Engine, dict[int, Job]]:
    e = engine(slots)
    e._moved = 0
    return e, {seq: generating(e, seq) for seq in running}


def test_a_gap_between_running_sequences_is_closed_by_moving_the_highest_down():
    e, jobs = gapped([[1, 1], [2, 2], [3, 3, 3], []], running=[0, 2])
    e._close_gaps()
    assert e._slots[1].job is jobs[2] and jobs[2].slot is e._slots[1] and e._slots[2].job is None
    assert e._llama.calls == [("rm", 1, -1, -1), ("cp", 2, 1, -1, -1), ("rm", 1, 3, -1)]
    assert e._slots[1].tokens == [3, 3, 3] and e._moved == 1


def test_the_gaps_history_moves_to_a_free_slot_first():
    history = SYSTEM + list(range(200, 400))
    e, jobs = gapped([[1], history, [3, 3], [4]], running=[0, 2])
    e._slots[1].used = 5
    e._close_gaps()
    assert e._slots[3].tokens == history and e._slots[3].used == 5   # kept, one slot up
    assert e._slots[1].job is jobs[2] and e._slots[1].tokens == [3, 3]
    assert [c[:3] for c in e._llama.calls if c[0] == "cp"] == [("cp", 1, 3), ("cp", 2, 1)]


def test_no_history_is_given_up_to_close_a_gap():
    history = SYSTEM + list(range(200, 400))
    e, jobs = gapped([[1], history, [3, 3], history + [5]], running=[0, 2])
    e._close_gaps()
    assert e._slots[2].job is jobs[2] and e._llama.calls == []


def test_a_sequence_still_reading_its_prompt_stays_put():
    e, jobs = gapped([[1], [], [3, 3]], running=[0, 2])
    jobs[2].fed, jobs[2].prepared = 0, PreparedPrompt("", (7, 7, 7), 1)
    e._close_gaps()
    assert e._slots[2].job is jobs[2] and e._llama.calls == []


def test_a_cancelled_sequence_is_not_moved_it_ends_at_the_next_step():
    e, jobs = gapped([[1], [], [3, 3]], running=[0, 2])
    jobs[2].sink.cancelled = True
    e._close_gaps()
    assert e._slots[2].job is jobs[2] and e._llama.calls == []


def test_two_gaps_close_in_two_moves():
    e, jobs = gapped([[1], [], [], [4], [5]], running=[0, 3, 4])
    e._close_gaps()
    assert [s.seq for s in e._slots if s.job is not None] == [0, 1, 2] and e._moved == 2


def test_a_prompt_held_whole_with_its_logits_is_reused_whole():
    e = engine([[], SYSTEM + [1, 2, 50, 51, 52], []])  # the prompt, then the answer it got
    e._slots[1].last = (42, "logits of token 42")
    assert place(e, SYSTEM + [1, 2]) == (1, 42)  # nothing to compute: the stored logits start it
    assert e._slots[1].tokens == SYSTEM + [1, 2]
    assert e._slots[1].last == (42, "logits of token 42")
    assert e._llama.calls == [("rm", 1, 42, -1)]


def test_stored_logits_of_another_prompt_length_are_dropped_with_their_cells():
    e = engine([SYSTEM + [1, 2, 3, 4]])
    e._slots[0].last = (44, "logits of token 44")
    assert place(e, SYSTEM + [1, 2]) == (0, 40)  # the last two computed again, as for any prefix
    assert e._slots[0].last is None


def test_stored_logits_of_a_shorter_prompt_outlive_a_longer_one():
    e = engine([SYSTEM + [1, 2]])
    e._slots[0].last = (42, "logits of token 42")
    assert place(e, SYSTEM + [1, 2, 3, 4, 5]) == (0, 42)  # its cells stay, so do their logits
    assert e._slots[0].last == (42, "logits of token 42")


def test_a_copy_carries_stored_logits_only_with_all_their_cells():
    e = engine([SYSTEM + [1, 2, 9, 9], [], []], busy={0})
    e._slots[0].last = (42, "logits of token 42")
    assert place(e, SYSTEM + [1, 2]) == (1, 42)  # the busy slot's cells and logits, copied
    assert e._slots[1].last == (42, "logits of token 42")
    e._copy(e._slots[0], e._slots[2], 41)
    assert e._slots[2].last is None


def test_common_prefix_compares_in_blocks_and_finds_the_first_difference():
    rng = random.Random(5)
    for _ in range(3000):
        base = [rng.randrange(3) for _ in range(rng.randrange(0, 700))]
        a, b = base[:rng.randrange(0, len(base) + 1)], list(base[:rng.randrange(0, len(base) + 1)])
        if b and rng.random() < 0.7:
            b[rng.randrange(len(b))] = 9
        expected = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == expected
        assert common_prefix(a, b, block=7) == expected


def test_a_prompt_given_as_a_tuple_is_placed():
    long = list(range(1000, 1600))  # longer than a block of the comparison
    e = engine([long + [1, 2, 9], []])
    slot, keep = e._place(tuple(long + [1, 2, 3]), list(e._slots))
    assert (slot.seq, keep) == (0, 601)



def test_a_placement_that_fails_refuses_its_request_and_the_engine_goes_on():
    e = engine([SYSTEM, []])
    e._waiting, e._invariant = collections.deque(), False
    sinks = [Sink(lambda: None) for _ in range(2)]
    for sink in sinks:
        e._waiting.append(Job(0, PreparedPrompt(text="", tokens=(1, 2), stop=(), max_tokens=4), None, sink))

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the placement")

    e._place = broken
    dropped, refused = e._admit()
    assert dropped == [] and not e._waiting
    assert [(job.sink, type(exc)) for job, exc in refused] == [(sinks[0], RuntimeError), (sinks[1], RuntimeError)]
    assert all(s.error is None for s in sinks)  # their sinks are told after the engine lock is let go
    e._lock = threading.Lock()
    e._wake, e._closing, e._chooser = threading.Condition(e._lock), True, None
    e._waiting.extend(job for job, _ in refused)
    e._run()  # one pass (closing): the refused requests hear of it, nothing hangs
    assert [type(s.error) for s in sinks] == [RuntimeError, RuntimeError]
    assert all(s.admitted.is_set() for s in sinks)
    assert e._slots[0].tokens == [] and ("rm", 0, -1, -1) in e._llama.calls  # the slots start over


def chunks_of(start: int, n: int, budget: int) -> list[tuple[int, int]]:
    """The chunks the engine's step loop cuts a prompt into, one whole budget per step."""
    chunks = []
    while start < n:
        left, first = budget, True
        while start < n:
            take = aligned_take(start, n - start, left, first)
            first = False
            if not take:
                break
            assert 2 <= take <= left or take == n - start == 1
            chunks.append((start, start + take))
            start, left = start + take, left - take
        assert chunks and chunks[-1][1] == start   # every step moves on
    return chunks


def test_prompt_chunks_end_on_the_kv_padding_and_never_hold_one_token():
    rng = random.Random(3)
    for _ in range(2000):
        start = rng.randrange(0, 1000)
        n = start + rng.randrange(2, 1500)
        budget = rng.choice([KV_PAD, 128, 512])
        chunks = chunks_of(start, n, budget)
        assert chunks[0][0] == start and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert all(b - a >= 2 for a, b in chunks)
        if budget >= KV_PAD:  # after the first chunk or two, every chunk ends on a multiple but the
            assert all(b % KV_PAD == 0 for _, b in chunks[2:-2])   # last two (no remainder of one)
    assert chunks_of(30, 1100, KV_PAD) == [(30, 256), (256, 512), (512, 768), (768, 1024), (1024, 1100)]
    assert chunks_of(255, 800, KV_PAD)[:2] == [(255, 257), (257, 512)]   # never a lone token
    assert chunks_of(511, 515, KV_PAD) == [(511, 515)]                    # a last chunk is not cut
