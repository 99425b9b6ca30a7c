"""Continuous batching for one GGUF model on llama.cpp.

One engine thread per loaded model drives ``llama_decode`` over a context that holds several
sequences (slots). Each step decodes the next token of every generating sequence in one
``llama_batch``, then chunks of the prompts still being prefilled, never beside generating
tokens and never a lone prompt token (see :func:`reusable`): prompts waiting together share
a batch, the same number of tokens each (:func:`equal_take`); with ``invariant``
(``--batch-invariant``) each chunk is cut at fixed positions and goes in a batch of its own
(see :func:`chunk_end`). A new request joins the running batch at the next step; a finished
or cancelled sequence frees its slot at once. A slot keeps the tokens it last held in the KV
cache, so a prompt sharing a prefix with them (the earlier turns of a chat) reuses those
cells instead of processing them again, and a prompt it holds whole (the same request again,
sampled anew) starts from the logits its last computation gave, with nothing computed. A new
request can also take a longer prefix (a system prompt) from any other slot, busy or not:
llama.cpp copies that slot's KV stream.
Every slot keeps its own stream, and busy slots are kept next to each other (llama.cpp
computes each run of consecutive streams as a pass of its own: :meth:`Engine._place`,
:meth:`Engine._close_gaps`). How far a sequence's numbers depend on what runs beside it
is a matter of llama.cpp's kernels for the model's weight types: docs/operations.md says
what is promised.

Request threads never touch llama.cpp here: they submit jobs and read their
chunks from a bounded buffer.  The engine never waits on a slow reader: a job
whose buffer is full simply sits out the next steps until it is drained.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from shimmy_core.plugin_api import (
    ChoiceText,
    Chunk,
    await_slot,
    check_room,
    Finish,
    PENALTY_LAST_N,
    PreparedPrompt,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
)

STREAM_BUFFER = 64             # chunks a job may have waiting for its reader before it pauses
PREFILL_CHUNK_WHILE_DECODING = 128  # prompt tokens per step while other sequences generate
PROMPT_CHUNK = 128             # prompts are computed in chunks cut at multiples of this position
KV_PAD = 256                   # llama.cpp attends over a stream's used cells rounded up to this
_IDLE_WAIT_S = 0.05
KEEP_HISTORY = 128             # cached tokens a new prompt would throw away that are worth a slot


@dataclass(eq=False)
class Job:
    """One choice of one request: its prompt, its sampling, its output buffer."""

    index: int
    prepared: PreparedPrompt
    params: SamplingParams
    sink: "Sink"
    # GBNF (root rule "root") the output must follow, and a trigger pattern: with one, the grammar
    # applies from where the generated text first matches it (its first group) on
    constraint: tuple[str, str | None] | None = None
    # engine-side state
    slot: "Slot | None" = None
    fed: int = 0                 # prompt tokens already in the KV cache
    last_token: int = -1
    sampler: object = None
    text: ChoiceText | None = None   # the output as text (set on admission)
    done: bool = False
    follow: "Job | None" = None  # a sibling choice whose prompt cells and logits this one takes
    stored: object = None        # the whole prompt was in its slot: these logits give its first token


class Greedy:
    """What llama.cpp's chain of a logit bias and greedy picks, without building its candidate
    array: the first token with the highest logit after the bias.

    ``llama_sampler_sample`` copies every logit into a candidate array, adds the biases, then
    scans it: 48 us a token for SmolLM2's 49,152-token vocabulary alone, 147 us in a busy
    server, on the one-stream critical path.  ``numpy.argmax`` returns the first maximum, as
    llama.cpp's ``>`` scan does, and the bias is the same float32 addition, so the token is the
    same."""

    def __init__(self, bias: Sequence[tuple[int, float]], n_vocab: int):
        import numpy as np

        self._bias = [(t, np.float32(b)) for t, b in bias if 0 <= t < n_vocab]

    def pick(self, logits) -> int:
        if self._bias:
            logits = logits.copy()
            for token, bias in self._bias:
                logits[token] += bias
        return int(logits.argmax())


class Sink:
    """Where the engine puts a request's chunks and the request thread reads them."""

    def __init__(self, wake_engine: Callable[[], None]):
        self._items: collections.deque[tuple[int, Chunk]] = collections.deque()
        self._backlog: collections.Counter[int] = collections.Counter()
        self._cond = threading.Condition()
        self._open_jobs = 0
        self._wake_engine = wake_engine
        self.cancelled = False
        self.admitted = threading.Event()
        self.error: BaseException | None = None

    # engine side
    def put(self, index: int, chunk: Chunk) -> None:
        with self._cond:
            self._items.append((index, chunk))
            self._backlog[index] += 1
            if isinstance(chunk, Usage):
                self._open_jobs -= 1
            self._cond.notify()

    def full(self, index: int) -> bool:
        return self._backlog[index] >= STREAM_BUFFER

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self.error = error
            self.admitted.set()
            self._cond.notify()

    # request side
    def read(self, cancelled: Callable[[], bool]) -> Iterator[tuple[int, Chunk]]:
        try:
            while True:
                with self._cond:
                    while not self._items and self._open_jobs > 0 and self.error is None:
                        if cancelled():
                            self.cancel()
                        self._cond.wait(_IDLE_WAIT_S)
                    items = list(self._items)
                    self._items.clear()
                    self._backlog.clear()
                    finished = self._open_jobs <= 0 or self.error is not None
                    error = self.error
                self._wake_engine()  # a paused job may run again
                yield from items
                if error is not None:
                    raise error
                if finished and not items:
                    return
                if cancelled():
                    self.cancel()
        finally:
            self.cancel()

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._wake_engine()


@dataclass(eq=False)
class Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)   # what this sequence holds in the KV cache
    job: Job | None = None
    used: int = 0                                      # when it last got a job (0: never)
    canon: int = 0                                     # leading cells computed as whole prompt chunks
    # (n, logits): the logits of the first n tokens' last one, as the prompt of that length
    # computed them (a copy); reused when the same prompt comes again (Engine._place)
    last: tuple[int, object] | None = None


def copy_worth(n_ctx_seq: int) -> int:
    """Prompt tokens a copy of a slot's KV stream must save to be worth it: llama.cpp copies
    streams only whole, about 3.5 ms per 1024 cells on the development machine, where a
    prompt token costs about 3 ms."""
    return max(2, n_ctx_seq // 512)


def wants_exact(params: SamplingParams) -> bool:
    """Whether a request asks for reproducible numbers: greedy, or seeded."""
    return params.temperature == 0 or params.seed is not None


def chunk_end(pos: int, n_prompt: int, chunk: int) -> int:
    """Where the prompt chunk starting at ``pos`` ends: at the next multiple of ``chunk``, or
    at the prompt's end.

    llama.cpp's CPU kernels round a token's numbers differently depending on how many tokens
    of its sequence share the batch (a lone token's attention is a dot product per row, two or
    more go through tinyBLAS; repacked weights take 4 rows at a time).  Cutting every prompt
    at the same positions, each chunk in a batch of its own, makes every prompt token's
    numbers a function of the prompt alone, whatever the cache held and whatever ran beside it."""
    return min(n_prompt, (pos // chunk + 1) * chunk)


def reusable(common: int, canon: int, n_prompt: int, exact: bool, chunk: int, stored: int = 0) -> int:
    """How many cells of a slot a prompt may reuse: ``common`` tokens agree, the first ``canon``
    cells were computed as whole chunks (:func:`chunk_end`), and the slot keeps the logits its
    first ``stored`` tokens ended with as a prompt (:attr:`Slot.last`; 0: none).

    All of them when the slot holds the whole prompt with those logits: the first token comes
    from them, the numbers computing the last two tokens again would give.

    By default every agreeing cell but those of the last two prompt tokens: llama.cpp computes
    a sequence's attention with a dot product per row when the batch holds one token of it and
    with tinyBLAS (whose result does not depend on the number of rows) for two or more, so a
    prompt token computed alone would round differently from the same token inside its prompt.

    An ``exact`` request (greedy or seeded, on a ``--batch-invariant`` server) reuses only whole
    chunks, so that it computes the rest exactly as a fresh prompt would, whatever the weight
    types: cells of a chunk cut short, or of generated tokens (computed one per step, beside
    other streams), are computed again."""
    if stored == n_prompt == common:
        return n_prompt
    if exact:
        return max(min(common, canon, n_prompt - 1) // chunk * chunk, 0)
    return max(min(common, n_prompt - 2), 0)


def prompt_take(remaining: int, budget: int) -> int:
    """How many of a prompt's ``remaining`` tokens to compute in this step with ``budget`` left:
    never a lone token (see :func:`reusable`), so never a remainder of one either."""
    take = min(budget, remaining)
    if remaining - take == 1:
        take -= 1
    if take < 2 and remaining >= 2:
        return 0
    return take


def aligned_take(start: int, remaining: int, budget: int, first: bool) -> int:
    """:func:`prompt_take`, cut where the budget allows so that the chunk ends at a multiple of
    ``KV_PAD``.  llama.cpp attends over a KV stream's used cells rounded up to ``KV_PAD``, so a
    chunk that ends just past a multiple computes scores for up to 255 empty cells in every
    layer.  A prompt continued from the cache starts anywhere, and without the cut every chunk
    after it paid that (in-process, a 4,000-token prompt after a 30-token cached start: 171-173
    prompt tok/s against 178-181 from position 0).  So a chunk from an unaligned start ends at
    the next multiple (two tokens when that is one away, never one), and a chunk from an
    aligned start takes whole multiples.  When no multiple is within the budget, the chunk
    takes the budget if it is the prompt's ``first`` in this step (the budget while others
    generate is smaller than ``KV_PAD``), else it waits for the next step's whole budget.  The
    prompt's last chunk, when it fits, is not cut: no chunk follows it."""
    if remaining <= budget:
        return prompt_take(remaining, budget)
    end = (start + budget) // KV_PAD * KV_PAD
    if start % KV_PAD:
        end = min(end, (start // KV_PAD + 1) * KV_PAD)
    if end - start == 1 and budget >= 2:
        end = start + 2
    if end - start >= 2:  # (end < start + remaining: the remaining prompt exceeds the budget)
        take = prompt_take(remaining, end - start)
        if take:
            return take
    return prompt_take(remaining, budget) if first else 0


def equal_take(remaining: Sequence[int], per: int) -> int:
    """How many prompt tokens each of several prompts computes in one shared batch: the same
    number for every one (llama.cpp cuts a batch over several KV streams into equal parts per
    sequence, so unequal parts would be cut again, into pieces as short as the shortest), at
    least two, at most ``per``, and leaving none of them a remainder of one (see
    :func:`reusable`); 0 when no number fits."""
    take = min(min(remaining), per)
    while take >= 2 and any(r - take == 1 for r in remaining):
        take -= 1
    return take if take >= 2 else 0


def stream_runs(seqs: Sequence[int]) -> int:
    """How many runs of consecutive sequence ids ``seqs`` make: with one KV stream per slot,
    llama.cpp splits a batch into a pass per run (``split_equal`` takes only consecutive
    streams), so a batch over slots 0, 1, 3 and 4 costs two passes over the weights."""
    ids = sorted(set(seqs))
    return sum(1 for i, seq in enumerate(ids) if i == 0 or seq != ids[i - 1] + 1)


def common_prefix(a: list[int], b: list[int], block: int = 256) -> int:
    """How many leading tokens the lists ``a`` and ``b`` share.  Whole blocks are compared as
    slices (at C speed), then the block that differs token by token: a long chat's prompt
    against every slot, at each admission, on the engine thread.  (Both must be lists: a list
    slice never equals a tuple slice.)"""
    n = min(len(a), len(b))
    start = 0
    while start < n:
        end = min(start + block, n)
        if a[start:end] != b[start:end]:
            return next((i for i in range(start, end) if a[i] != b[i]), end)
        start = end
    return n


class ThreadChooser:
    """The thread count of one-token steps (one stream generating), picked from how long such
    steps take end to end on this machine, now.

    llama.cpp runs a one-token step on ``n_threads``.  Whether more threads help depends on the
    machine and on what else wants its cores: the HTTP side of each token, a client on the same
    machine, other processes (OpenMP threads that wait at a barrier for a descheduled sibling
    make a step many times slower).  So the engine times the interval from one one-token step to
    the next (the decode and all the Python around it) for each candidate, keeps a moving
    average, and uses the fastest: each candidate first gets ``WARMUP`` steps, then now and
    then one step tries another (a look), so that a change is seen.

    A look costs a slow step (one thread instead of two took 20.5 against 12.6 ms here, so a
    look every 32 steps cost 2% of one stream's speed).  So the steps between looks double,
    from ``EXPLORE_EVERY`` up to ``EXPLORE_MAX``, while looks keep finding the other count more
    than ``CLEARLY`` slower, and go back to ``EXPLORE_EVERY`` when one does not.  A change is
    still seen soon: when the count in use slows (another process takes a core), every step
    counts against it and the other wins within a few steps; when a look finds the other count
    faster than the one in use, it is used from the next step on.  A change of the count in use
    starts the looks over at ``EXPLORE_EVERY``, and a single slow step (a passing preemption)
    counts as at most twice the average, so that it cannot switch counts alone.  An interval
    broken by anything else (a prompt chunk, another stream, an idle wait) is not counted.
    Thread counts do not change llama.cpp's numbers: only speed is at stake."""

    WARMUP = 8
    EXPLORE_EVERY = 32
    EXPLORE_MAX = 256
    CLEARLY = 1.10
    ALPHA = 0.2

    def __init__(self, choices: Sequence[int], clock: Callable[[], float] = time.perf_counter):
        self.choices = sorted(set(choices), reverse=True)
        self.mean: dict[int, float | None] = {n: None for n in self.choices}
        self.samples = dict.fromkeys(self.choices, 0)
        self._clock = clock
        self._last: tuple[float, int] | None = None
        self._looking = False      # the step being timed is a look
        self._steps = 0
        self._gap = self.EXPLORE_EVERY
        self._next_look = self.EXPLORE_EVERY
        self._looks = 0

    def interrupt(self) -> None:
        """The next one-token step does not follow one directly: no interval to count."""
        self._last = None

    def best(self) -> int:
        measured = [n for n in self.choices if self.mean[n] is not None]
        return min(measured, key=lambda n: self.mean[n]) if measured else self.choices[0]

    def pick(self) -> int:
        """The thread count for the one-token step about to run."""
        now = self._clock()
        if self._last is not None:
            started, n = self._last
            self._count(n, now - started)
        self._steps += 1
        unsure = [n for n in self.choices if self.samples[n] < self.WARMUP]
        self._looking = False
        if unsure:
            choice = unsure[0]
        elif self._steps >= self._next_look:
            others = [n for n in self.choices if n != self.best()]
            choice = others[self._looks % len(others)]
            self._looks += 1
            self._looking = True
            self._next_look = self._steps + self._gap
        else:
            choice = self.best()
        self._last = (now, choice)
        return choice

    def _count(self, n: int, seconds: float) -> None:
        in_use = self.best()
        best = self.mean[in_use]
        old = self.mean[n]
        # one step slowed by a passing preemption moves the average by at most ALPHA
        self.mean[n] = seconds if old is None else old + self.ALPHA * (min(seconds, 2 * old) - old)
        self.samples[n] += 1
        if self._looking and best is not None:
            if seconds < best:
                self.mean[n] = seconds      # faster than the count in use: take it from now on
            self._gap = min(2 * self._gap, self.EXPLORE_MAX) if seconds > best * self.CLEARLY else self.EXPLORE_EVERY
            self._next_look = self._steps + self._gap
        elif self.best() != in_use:         # the count in use slowed: look often again
            self._gap = self.EXPLORE_EVERY
            self._next_look = self._steps + self._gap


class Engine:
    """Schedules jobs onto ``n_slots`` sequences of one llama.cpp context."""

    def __init__(self, model, ctx, *, n_slots: int, n_batch: int, queue_size: int, queue_timeout: float,
                 invariant: bool = False, decode_threads: Sequence[int] = ()):
        """``decode_threads``: the thread counts one-token steps may use (:class:`ThreadChooser`);
        none or one: the context's own."""
        import llama_cpp

        self._llama = llama_cpp
        self._model = model           # llama_cpp._internals.LlamaModel
        self._ctx = ctx               # llama_cpp._internals.LlamaContext
        self._vocab = model.vocab
        self._n_vocab = model.n_vocab()
        self._memory = llama_cpp.llama_get_memory(ctx.ctx)
        self._n_batch = n_batch
        self._chunk = min(PROMPT_CHUNK, n_batch)
        self._invariant = invariant   # prompts cut at fixed positions; exact requests reuse whole chunks
        self._queue_size = queue_size
        self._queue_timeout = queue_timeout
        self._slots = [Slot(seq) for seq in range(n_slots)]
        self._worth = copy_worth(llama_cpp.llama_n_ctx_seq(ctx.ctx))
        self._prompt_decoded = 0      # prompt tokens llama.cpp processed (not reused)
        self._shared_prompt_batches = 0   # llama_decode calls that held several prompts
        self._moved = 0               # running sequences moved down into a gap (_close_gaps)
        self._stored_starts = 0       # prompts held whole in a slot, started from its stored logits
        self._admitted = 0            # jobs given a slot so far (the clock of Slot.used)
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._batch = llama_cpp.llama_batch_init(n_batch + n_slots, 0, 1)
        self._piece_buf = ctypes.create_string_buffer(256)
        self._threads = llama_cpp.llama_n_threads(ctx.ctx)
        self._threads_batch = llama_cpp.llama_n_threads_batch(ctx.ctx)
        self._chooser = ThreadChooser(decode_threads) if len(set(decode_threads)) > 1 else None
        self._thread = threading.Thread(target=self._run, name="shimmy-gguf-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ request side
    def submit(
        self, choices: Sequence[tuple[PreparedPrompt, SamplingParams]], cancelled: Callable[[], bool],
        constraints: Sequence[tuple[str, str | None] | None] | None = None,
    ) -> Iterator[tuple[int, Chunk]]:
        """Queue every choice; wait until the first one has a slot; return the merged chunks.
        ``constraints[i]`` is the (GBNF, trigger pattern) choice ``i`` samples under (``None``: free).

        Raises :class:`Overloaded` (a 503) when the queue cannot take them or the wait
        for a slot passes the queue timeout, before anything reached the client.
        """
        sink = Sink(self.wake)
        constraints = constraints or [None] * len(choices)
        jobs = [Job(i, prepared, params, sink, constraint)
                for i, ((prepared, params), constraint) in enumerate(zip(choices, constraints))]
        with self._lock:
            busy = sum(1 for s in self._slots if s.job is not None)
            check_room(len(self._waiting), busy, len(self._slots), len(jobs), self._queue_size)
            sink._open_jobs = len(jobs)
            self._waiting.extend(jobs)
            self._wake.notify()

        def give_up() -> None:  # the engine ends the jobs; the reader sees them finish
            sink.cancel()
            with self._lock:
                self._waiting = collections.deque(j for j in self._waiting if j.sink is not sink)

        await_slot(sink.admitted, cancelled, give_up, self._queue_timeout, _IDLE_WAIT_S)
        if sink.error is not None:
            raise sink.error
        return sink.read(cancelled)

    def check_grammar(self, grammar: str) -> bool:
        """Whether llama.cpp accepts this GBNF grammar (its root rule named ``root``)."""
        sampler = self._llama.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            return False
        self._llama.llama_sampler_free(sampler)
        return True

    def wake(self) -> None:
        with self._lock:
            self._wake.notify()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self._llama.llama_batch_free(self._batch)

    def stats(self) -> dict[str, object]:
        ctx = self._ctx.ctx   # llama.cpp's own thread counts: one-token steps, larger batches
        threads = {"threads": self._llama.llama_n_threads(ctx), "threads_batch": self._llama.llama_n_threads_batch(ctx)}
        if self._chooser is not None:  # what one-token steps took with each thread count
            threads["one_token_step_ms"] = {str(n): None if m is None else round(m * 1000, 2)
                                            for n, m in self._chooser.mean.items()}
        with self._lock:
            return {"busy_slots": sum(1 for s in self._slots if s.job), "queued": len(self._waiting),
                    "prompt_tokens_decoded": self._prompt_decoded,
                    "shared_prompt_batches": self._shared_prompt_batches, "moved_sequences": self._moved,
                    "stored_logits_starts": self._stored_starts,
                    **threads}

    # ------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while True:
            failure = None
            with self._lock:
                dropped, refused = self._admit()
                try:
                    self._close_gaps()
                except Exception as exc:  # a bug: fail the running jobs as a failed step would
                    failure = exc
                active = [s.job for s in self._slots if s.job is not None]
                closing = self._closing
                idle = not any(self._runnable(j) for j in active)
                if idle and not closing and not dropped:
                    if self._chooser is not None:
                        self._chooser.interrupt()
                    self._wake.wait(_IDLE_WAIT_S)
            # Sinks are written outside the engine lock: a reader may hold its sink's lock
            # while it wakes the engine.
            for job in dropped:  # gone before they got a slot
                job.sink.put(job.index, Finish("length"))
                job.sink.put(job.index, Usage(len(job.prepared.tokens), 0))
            for job, exc in refused:
                job.sink.fail(exc)
            if closing:
                break
            if failure is not None:
                self._fail_running(active, failure)
            elif not idle:
                try:
                    self._step(active)
                except Exception as exc:  # llama.cpp failed: fail the running jobs, keep serving
                    self._fail_running(active, exc)

    def _fail_running(self, active: list[Job], exc: Exception) -> None:
        """End the running jobs with ``exc`` and empty every slot: the cache no longer matches
        what the slots recorded."""
        for job in active:
            job.sink.fail(exc)
            self._release(job)
        for slot in self._slots:
            self._forget(slot)

    def _runnable(self, job: Job) -> bool:
        return job.sink.cancelled or not job.sink.full(job.index)

    def _admit(self) -> tuple[list[Job], list[tuple[Job, Exception]]]:
        """Give free slots to waiting jobs (called with the lock held); return the waiting jobs
        dropped because their request was cancelled, and those whose placement failed, with the
        error (their sinks are told outside the lock)."""
        dropped, refused = [], []
        while self._waiting:
            job = self._waiting[0]
            if job.sink.cancelled:
                dropped.append(self._waiting.popleft())
                continue
            free = [s for s in self._slots if s.job is None]
            if not free:
                break
            self._waiting.popleft()
            try:
                self._give_slot(job, free)
            except Exception as exc:  # a bug here must fail the request, not stop the engine
                if job.slot is not None:
                    self._release(job)
                for slot in free:  # a placement cut short: what the slots recorded may be wrong
                    self._forget(slot)
                refused.append((job, exc))
        return dropped, refused

    def _give_slot(self, job: Job, free: list[Slot]) -> None:
        """Place ``job`` in one of the ``free`` slots and set it up to run (lock held)."""
        tokens = job.prepared.tokens
        # The n choices of a request share one prompt: the first processes it, the others
        # take its cells and logits once it is done, if that saves more than a copy costs.
        leader = next((s.job for s in self._slots if s.job is not None and s.job.sink is job.sink
                       and s.job.prepared is job.prepared and s.job.follow is None), None)
        slot, keep = self._place(tokens, free, copy=leader is None,
                                 exact=self._invariant and wants_exact(job.params))
        if leader is not None and len(tokens) - 1 - keep >= self._worth:
            job.follow = leader
        self._admitted += 1
        slot.job, job.slot, slot.used = job, slot, self._admitted
        job.fed = keep
        if keep == len(tokens):  # held whole, with its logits (_place): nothing to compute
            job.stored = slot.last[1]
            self._stored_starts += 1
        job.sampler = self._sampler(job.params, job.constraint)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        job.text = ChoiceText(job.prepared.stop, len(tokens), decoder.decode,
                              lambda d=decoder: d.decode(b"", final=True))
        job.text.cached = keep
        job.sink.admitted.set()

    def _close_gaps(self) -> None:
        """Move running sequences down into free slots between busy ones, so that the busy
        slots form one run (called with the lock held).  A sequence that ended between two
        others leaves a gap that makes every later step two passes (:func:`stream_runs`);
        moving the highest generating sequence into it costs a copy of its stream once.  The
        gap's own history, when worth keeping, first moves to a free slot holding none; when
        there is no such slot the gap stays (no history is given up for it)."""
        while True:
            busy = [s for s in self._slots if s.job is not None]
            seqs = [s.seq for s in busy]
            if stream_runs(seqs) <= 1:
                return
            top = max(busy, key=lambda s: s.seq)
            job = top.job
            hole = next(s for s in self._slots if s.job is None and s.seq < top.seq)
            if job.sink.cancelled or job.follow is not None or job.fed < len(job.prepared.tokens):
                return  # only a generating sequence moves (a prompt's siblings follow its slot;
                        # a cancelled one ends at the next step anyway)
            after = [q for q in seqs if q != top.seq] + [hole.seq]
            if (stream_runs(after), max(after) - min(after)) >= (stream_runs(seqs), max(seqs) - min(seqs)):
                return
            if len(hole.tokens) >= KEEP_HISTORY:
                spare = next((s for s in reversed(self._slots) if s.job is None and s is not hole
                              and len(s.tokens) < KEEP_HISTORY), None)
                if spare is None:
                    return
                self._move(hole, spare)
            self._move(top, hole)
            hole.job, job.slot, top.job = job, hole, None
            self._moved += 1

    def _place(self, tokens: Sequence[int], free: list[Slot], copy: bool = True,
               exact: bool = False) -> tuple[Slot, int]:
        """Pick a free slot for ``tokens`` and make its KV cells hold the longest prefix of
        them that any slot has; return the slot and how many prompt tokens it now holds.

        The slot keeps the busy slots together: llama.cpp computes each run of consecutive
        KV streams in a batch as a pass of its own (:func:`stream_runs`; two streams in slots
        0 and 2 took 40 ms a step against 17 in slots 0 and 1).  Within that, the slot that
        already holds the most of the prompt wins, then the lowest.  Slots holding a history
        worth keeping (KEEP_HISTORY tokens the prompt does not share) come last, the least
        recently used first: an idle chat's history outlives an unrelated request.  When that
        slot would split the busy ones into more runs than another free slot would (and holds
        no more of the prompt than that one), the other slot's history moves into it (a copy
        of its stream) and the request takes the other slot: the least recently used history
        still goes, and the batch stays whole.  When another slot (busy or not) holds a
        longer prefix, it is copied over (only with ``copy``) if that saves
        :func:`copy_worth` prompt tokens.  What may be reused is :func:`reusable`'s (the whole
        prompt when a slot holds it with its stored logits)."""
        n = len(tokens)
        prompt = list(tokens)
        shared = {s.seq: common_prefix(s.tokens, prompt) for s in self._slots}

        def usable(s: Slot) -> int:
            return reusable(shared[s.seq], s.canon, n, exact, self._chunk, s.last[0] if s.last else 0)

        own = {s.seq: usable(s) for s in free}
        busy = [s.seq for s in self._slots if s.job is not None]

        def worth_keeping(s: Slot) -> bool:
            return len(s.tokens) - shared[s.seq] >= KEEP_HISTORY

        def rank(s: Slot) -> tuple[bool, int, int, int, int]:
            keep_it = worth_keeping(s)
            span = max(busy + [s.seq]) - min(busy + [s.seq])
            return keep_it, (s.used if keep_it else 0), span, -own[s.seq], s.seq

        slot = min(free, key=rank)
        if busy:
            tidy = min(free, key=lambda s: (stream_runs(busy + [s.seq]), rank(s)))
            if (stream_runs(busy + [tidy.seq]) < stream_runs(busy + [slot.seq])
                    and own[slot.seq] - own[tidy.seq] < self._worth):  # (else the prompt's cells would go)
                if worth_keeping(tidy):
                    self._move(tidy, slot)
                    shared[slot.seq] = shared[tidy.seq]  # it holds tidy's cells now
                slot = tidy
        donor = max(self._slots, key=usable)
        best = usable(donor)
        if copy and best - own[slot.seq] >= self._worth:
            self._copy(donor, slot, best)
            return slot, best
        keep = own[slot.seq]
        self._llama.llama_memory_seq_rm(self._memory, slot.seq, keep, -1)
        del slot.tokens[keep:]
        slot.canon = min(slot.canon, keep)
        if slot.last is not None and slot.last[0] > keep:
            slot.last = None
        return slot, keep

    def _copy(self, donor: Slot, slot: Slot, keep: int) -> None:
        """Make ``slot`` hold the first ``keep`` cells of ``donor`` (llama.cpp copies streams
        only whole: copy, then cut)."""
        self._llama.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
        self._llama.llama_memory_seq_cp(self._memory, donor.seq, slot.seq, -1, -1)
        self._llama.llama_memory_seq_rm(self._memory, slot.seq, keep, -1)
        slot.tokens[:] = donor.tokens[:keep]
        slot.canon = min(donor.canon, keep)
        slot.last = donor.last if donor.last is not None and donor.last[0] <= keep else None

    def _move(self, source: Slot, target: Slot) -> None:
        """Give ``target`` all of ``source``'s cells and its place in the least-recently-used
        order (``source`` keeps a copy until it is reused)."""
        self._copy(source, target, len(source.tokens))
        target.used = source.used

    def _forget(self, slot: Slot) -> None:
        """Empty ``slot``'s cells and what it recorded of them."""
        self._llama.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
        slot.tokens.clear()
        slot.canon = 0
        slot.last = None

    def _release(self, job: Job) -> None:
        slot = job.slot
        if slot is not None and slot.job is job:
            slot.job = None
        job.slot = None
        job.done = True

    def _finish(self, job: Job, reason: str) -> None:
        for chunk in job.text.finish(reason):
            job.sink.put(job.index, chunk)
        self._release(job)

    def _step(self, active: list[Job]) -> None:
        """One step: prompt chunks, each in a ``llama_decode`` of its own, as many as the step's
        budget holds, then the next token of every generating sequence in one ``llama_decode``.
        A prompt chunk never shares a batch: llama.cpp would cut it into pieces as long as the
        other sequences' parts (a lone token beside a decoding sequence).

        Prompts go first: a request admitted at this step gets its first token one generating
        decode sooner (what llama-server's mixed batch gives it), and a prompt finished here
        generates in this step's batch.  The running streams lose nothing: a step holds the same
        decodes in either order, so the time between their tokens is the same."""
        for job in active:  # a sibling that went away before its prompt was in: go it alone
            leader = job.follow
            if leader is not None and (leader.done or leader.slot is None):
                job.follow = None
        for job in active:  # prompts held whole: their first token from the stored logits
            if job.stored is not None:
                logits, job.stored = job.stored, None
                if not job.sink.cancelled:
                    self._prompt_done(job, logits, active)
        for job in active:
            if not job.done and job.sink.cancelled:
                self._finish(job, "length")
        will_generate = any(self._generates(job) for job in active)
        decoded = self._prompt_decoded
        self._prefill(active, self._n_batch if not will_generate
                      else min(self._n_batch, PREFILL_CHUNK_WHILE_DECODING))
        generating = [job for job in active if self._generates(job)]
        if self._chooser is not None:
            prefilling = self._prompt_decoded != decoded or any(
                not j.done and j.fed < len(j.prepared.tokens) for j in active)
            if len(generating) == 1 and not prefilling:
                self._set_threads(self._chooser.pick())
            else:
                self._chooser.interrupt()
        if generating:
            for i, job in enumerate(generating):
                self._add(i, job, job.last_token, True)
            self._decode(len(generating))
            for i, job in enumerate(generating):
                self._emit(job, i)

    @staticmethod
    def _generates(job: Job) -> bool:
        return not job.done and job.fed == len(job.prepared.tokens) and not job.sink.full(job.index)

    def _prefill(self, active: list[Job], budget: int) -> None:
        """This step's prompt chunks, ``budget`` tokens in all."""
        if not self._invariant:
            budget = self._prefill_together(active, budget)
        for job in active:
            tokens = job.prepared.tokens
            first = True
            while not job.done and job.fed < len(tokens) and job.follow is None:
                start = job.fed
                if self._invariant:
                    end = chunk_end(start, len(tokens), self._chunk)
                    if end - start > budget:
                        break  # the next step
                else:
                    take = aligned_take(start, len(tokens) - start, budget, first)
                    first = False
                    if take == 0:
                        break  # the next step
                    end = start + take
                for i in range(start, end):
                    self._add(i - start, job, tokens[i], i == len(tokens) - 1)
                self._decode(end - start)
                slot = job.slot
                if slot.canon == start and start % self._chunk == 0 and end - start == self._chunk:
                    slot.canon = end  # a whole chunk, at its fixed place, after whole chunks
                job.fed = end
                self._prompt_decoded += end - start
                budget -= end - start
                if end == len(tokens):
                    self._prompt_done(job, end - start - 1, active)

    def _prefill_together(self, active: list[Job], budget: int) -> int:
        """Prompts of several sequences in one ``llama_decode``, the same number of tokens each
        (:func:`equal_take`), while at least two are waiting and the budget holds them; return
        the budget left.  One pass over the weights serves them all, where a batch each would
        read every weight once per prompt: what a burst of new requests waits for.  Each
        sequence's part is computed as it would be in a batch of its own (a weight row's dot
        product per token, and attention per KV stream), which the default determinism promise
        needs and ``tests/test_batching.py`` checks."""
        pending = [j for j in active if not j.done and j.fed < len(j.prepared.tokens) and j.follow is None]
        while len(pending) >= 2:
            group, take = pending, 0
            while len(group) >= 2:
                take = equal_take([len(j.prepared.tokens) - j.fed for j in group], budget // len(group))
                if take:
                    break
                group = group[:-1]
            if len(group) < 2 or not take:
                break
            n, last = 0, {}
            for job in group:
                tokens = job.prepared.tokens
                for i in range(job.fed, job.fed + take):
                    self._add(n, job, tokens[i], i == len(tokens) - 1)
                    n += 1
                last[job] = n - 1
            self._decode(n)
            self._shared_prompt_batches += 1
            budget -= n
            for job in group:
                job.fed += take
                self._prompt_decoded += take
                if job.fed == len(job.prepared.tokens):
                    self._prompt_done(job, last[job], active)
            pending = [j for j in pending if not j.done and j.fed < len(j.prepared.tokens)]
        return budget

    def _prompt_done(self, job: Job, source: "int | object", active: list[Job]) -> None:
        """``job``'s whole prompt is in: its first token from batch output ``source`` (or from
        logits its slot stored, :attr:`Slot.last`).  Sibling choices take the whole prompt's
        cells and its last logits: the same numbers as the first choice, without processing the
        prompt again."""
        slot = job.slot   # before the first token, which may end the job and free it
        if isinstance(source, int) and not self._invariant:
            # (--batch-invariant computes an exact request's prompt end anew every time)
            slot.last = (len(job.prepared.tokens), self._logits(source).copy())
        self._emit(job, source)
        for other in active:
            if other.follow is job and not other.done:
                self._copy(slot, other.slot, len(other.prepared.tokens))
                other.fed, other.follow = len(other.prepared.tokens), None
                self._emit(other, source)

    def _add(self, n: int, job: Job, token: int, logits: bool) -> None:
        """Put ``token`` of ``job``'s sequence at index ``n`` of the batch."""
        batch, slot = self._batch, job.slot
        batch.token[n] = token
        batch.pos[n] = len(slot.tokens)
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = slot.seq
        batch.logits[n] = logits
        slot.tokens.append(token)

    def _set_threads(self, n: int) -> None:
        if n != self._threads:
            self._llama.llama_set_n_threads(self._ctx.ctx, n, self._threads_batch)
            self._threads = n

    def _decode(self, n: int) -> None:
        self._batch.n_tokens = n
        status = self._llama.llama_decode(self._ctx.ctx, self._batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

    def _emit(self, job: Job, source: "int | object") -> None:
        """Sample the next token of ``job`` from batch output ``source`` (or from stored
        logits) and pass it on."""
        sampler = job.sampler
        if isinstance(sampler, Greedy):
            token = sampler.pick(self._logits(source))
        elif isinstance(source, int):
            token = sampler.sample(self._ctx, source)
        else:
            token = self._sample_stored(sampler, source)
        if self._llama.llama_vocab_is_eog(self._vocab, token):
            self._finish(job, "stop")
            return
        piece = self._piece(token)
        logprob = self._logprob(source, token, piece, job.params.top_logprobs) if job.params.logprobs else None
        for chunk in job.text.add(piece, logprob):
            job.sink.put(job.index, chunk)
        if job.text.done:  # a stop string
            self._release(job)
        elif job.text.generated >= job.prepared.max_tokens:
            self._finish(job, "length")
        else:
            job.last_token = token

    # ------------------------------------------------------------ sampling
    def _sampler(self, params: SamplingParams, constraint: tuple[str, str | None] | None):
        from llama_cpp._internals import LlamaSampler

        if params.temperature == 0 and constraint is None and not (params.presence_penalty or params.frequency_penalty):
            return Greedy(params.logit_bias, self._n_vocab)
        sampler = LlamaSampler()
        if constraint is not None:
            grammar, trigger = constraint
            if trigger is None:
                added = self._llama.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
            else:
                patterns = (ctypes.c_char_p * 1)(trigger.encode("utf-8"))
                added = self._llama.llama_sampler_init_grammar_lazy_patterns(
                    self._vocab, grammar.encode("utf-8"), b"root", patterns, 1, (self._llama.llama_token * 0)(), 0)
            self._llama.llama_sampler_chain_add(sampler.sampler, added)
        if params.logit_bias:
            sampler.add_logit_bias(self._n_vocab, dict(params.logit_bias))
        if params.presence_penalty or params.frequency_penalty:
            sampler.add_penalties(self._n_vocab, PENALTY_LAST_N, 1.0, params.frequency_penalty,
                                  params.presence_penalty)
        if params.temperature == 0:
            sampler.add_greedy()
            return sampler
        if params.top_k > 0:
            sampler.add_top_k(params.top_k)
        sampler.add_temp(params.temperature)
        if params.top_p < 1.0:
            sampler.add_top_p(params.top_p, 1)
        if params.min_p > 0.0:
            sampler.add_min_p(params.min_p, 1)
        seed = secrets.randbits(31) if params.seed is None else params.seed % 0xFFFFFFFF
        sampler.add_dist(seed)
        return sampler

    def _piece(self, token: int) -> bytes:
        n = self._llama.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, False)
        return self._piece_buf.raw[: max(n, 0)]

    def _logits(self, source: "int | object"):
        """The logits ``source`` stands for: batch output ``source`` as a numpy view of
        llama.cpp's buffer, or stored logits (:attr:`Slot.last`) as they are."""
        import numpy as np

        if not isinstance(source, int):
            return source
        ptr = self._llama.llama_get_logits_ith(self._ctx.ctx, source)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def _sample_stored(self, sampler, logits) -> int:
        """What ``llama_sampler_sample`` does with a batch output's logits, done with stored
        ones: every token a candidate, the chain applied, the chosen token accepted."""
        import numpy as np

        llama = self._llama
        cur = np.zeros(len(logits), dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        cur["id"] = np.arange(len(logits), dtype=np.int32)
        cur["logit"] = logits
        candidates = llama.llama_token_data_array(
            data=cur.ctypes.data_as(ctypes.POINTER(llama.llama_token_data)), size=len(cur), selected=-1, sorted=False)
        llama.llama_sampler_apply(sampler.sampler, ctypes.byref(candidates))
        if not 0 <= candidates.selected < candidates.size:
            raise RuntimeError("the sampler chose no token")
        token = int(candidates.data[candidates.selected].id)
        llama.llama_sampler_accept(sampler.sampler, token)
        return token

    def _logprob(self, source: "int | object", token: int, piece: bytes, top_n: int) -> TokenLogprob:
        import numpy as np

        logits = np.asarray(self._logits(source), dtype=np.float64)
        peak = logits.max()
        lse = peak + math.log(float(np.exp(logits - peak).sum()))
        top: tuple[TopLogprob, ...] = ()
        if top_n:
            best = np.argpartition(-logits, top_n)[:top_n]
            best = best[np.argsort(-logits[best])]
            top = tuple(
                TopLogprob(_text(p := self._piece(int(t))), float(logits[t] - lse), tuple(p)) for t in best
            )
        return TokenLogprob(_text(piece), float(logits[token] - lse), tuple(piece), top)


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")
