"""The batching engine of the SafeTensors backend: one thread per loaded model
runs the transformers model and samples every row of the batch.

Imported only when a SafeTensors model loads (it imports torch).

How a request flows: :meth:`BatchEngine.submit` puts the :class:`Job` of
every choice of a request (one :class:`Ticket`) in a bounded waiting queue,
or refuses them all with :class:`~shimmy_core.contract.generation.Overloaded`.  The
engine thread admits waiting jobs while fewer than ``parallel`` rows run,
prefills each one alone in chunks (interleaved with decode steps of the
running rows), samples its first token, and merges its key/value cache into
the running batch: shorter caches are left-padded with zeros that the
attention mask hides, and each row carries its own position ids.  Every decode
step feeds one token per row; a row leaves the batch when it samples an
end-of-generation id, reaches its token limit, or is cancelled (client gone,
stop string found by the request thread), and padding columns that no row
needs any more are trimmed.

Sampling follows the GGUF backend's llama.cpp chain exactly: logit_bias, then
presence/frequency penalties over the last ``PENALTY_LAST_N`` generated
tokens, then greedy at temperature 0, else top_k, temperature, top_p, min_p
(each keeping at least one token) and a draw from a per-choice seeded
``torch.Generator``.
A row with an output format (``Job.constraint``, see ``safetensors_constraints``)
first has the tokens its grammar forbids set to ``-inf``, greedy or not; its
end-of-generation ids are allowed only where the grammar accepts, and the row
ends with ``stop`` as soon as the grammar allows nothing but the end.  A matcher
that fails ends its request with that error, not the engine.  Rows without a
format pay nothing for this.
Logprobs are the log-softmax of the model's raw logits, as llama.cpp reports
them (logit_bias, penalties and the output format change the choice, not the
reported numbers).

A ticket's output is one queue of ``(choice, ("token", id, logprob, top))``
items, then ``(choice, ("end", reason))`` for each choice, or
``(None, ("error", exception))``; the request thread turns ids into text.  The
queue is bounded by the tokens its choices may generate, so the engine never
waits on a slow client.
"""

from __future__ import annotations

import collections
import inspect
import math
import os
import queue
import secrets
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from shimmy_core.plugin_api import PENALTY_LAST_N, BackendError, SamplingParams, check_room

_IDLE_WAIT_S = 1.0


class EngineError(BackendError):
    """Generation failed inside the engine (the model raised); the message says how."""


class Ticket:
    """The choices of one request: their output queue and their state as the request side sees it."""

    def __init__(self, capacity: int):
        self.out: queue.Queue = queue.Queue(maxsize=capacity)
        self.admitted = threading.Event()   # set when the engine takes the first choice
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, index: int | None, item: tuple) -> None:
        self.out.put_nowait((index, item))  # sized for every token and end marker: never full


@dataclass(eq=False)
class Job:
    """One choice to generate: the prompt's ids, how to sample, its ticket."""

    index: int
    tokens: list[int]
    params: SamplingParams
    max_tokens: int
    eog: frozenset[int]
    ticket: Ticket
    stopped: threading.Event = field(default_factory=threading.Event)  # a stop string ended it
    # The output format's matcher (safetensors_constraints.TokenConstraint), None for free text:
    # mask(logits) -> masked copy, advance(token), finished.
    constraint: Any = None

    @property
    def cancelled(self) -> bool:
        return self.ticket.cancelled.is_set() or self.stopped.is_set()

    def emit(self, item: tuple) -> None:
        self.ticket.put(self.index, item)


class _Sampler:
    """The per-row sampling chain (CPU tensors)."""

    def __init__(self, params: SamplingParams, vocab: int):
        self.params = params
        bias = [(t, b) for t, b in params.logit_bias if 0 <= t < vocab]
        self.bias_ids = torch.tensor([t for t, _ in bias], dtype=torch.long) if bias else None
        self.bias_values = torch.tensor([b for _, b in bias], dtype=torch.float32) if bias else None
        self.penalize = bool(params.presence_penalty or params.frequency_penalty)
        self.history: collections.deque[int] = collections.deque(maxlen=PENALTY_LAST_N)
        self.counts: collections.Counter[int] = collections.Counter()
        self.generator: torch.Generator | None = None
        if params.temperature != 0:
            seed = secrets.randbits(31) if params.seed is None else params.seed % 0xFFFFFFFF
            self.generator = torch.Generator().manual_seed(seed)

    def accept(self, token: int) -> None:
        if not self.penalize:
            return
        if len(self.history) == self.history.maxlen:
            old = self.history[0]
            self.counts[old] -= 1
            if not self.counts[old]:
                del self.counts[old]
        self.history.append(token)
        self.counts[token] += 1

    def sample(self, logits: torch.Tensor) -> int:
        params = self.params
        x = logits
        if self.bias_ids is not None:
            x = x.clone()
            x[self.bias_ids] += self.bias_values
        if self.penalize and self.counts:
            if x is logits:
                x = x.clone()
            ids = torch.tensor(list(self.counts), dtype=torch.long)
            counts = torch.tensor(list(self.counts.values()), dtype=torch.float32)
            x[ids] -= counts * params.frequency_penalty + params.presence_penalty
        if self.generator is None:
            return int(torch.argmax(x))
        ids: torch.Tensor | None = None  # candidate ids when x no longer covers the whole vocabulary
        top_k = getattr(params, "top_k", 0) or 0
        if 0 < top_k < x.numel():
            x, ids = torch.topk(x, top_k)  # sorted, most likely first
        x = x / params.temperature
        if params.top_p < 1.0:
            if ids is None:
                x, ids = torch.sort(x, descending=True)
            probs = torch.softmax(x, dim=-1)
            keep = int((torch.cumsum(probs, dim=-1) < params.top_p).sum()) + 1
            keep = min(max(keep, 1), x.numel())
            x, ids = x[:keep], ids[:keep]
        min_p = getattr(params, "min_p", 0.0) or 0.0
        if min_p > 0.0:
            kept = x >= x.max() + math.log(min_p)
            if ids is None:
                ids = torch.nonzero(kept).flatten()
            else:
                ids = ids[kept]
            x = x[kept]
        probs = torch.softmax(x, dim=-1)
        choice = int(torch.multinomial(probs, 1, generator=self.generator))
        return int(ids[choice]) if ids is not None else choice


@dataclass
class _Row:
    job: Job
    sampler: _Sampler
    generated: int = 0


@dataclass
class _Prefill:
    job: Job
    cache: Any
    done: int = 0  # prompt tokens already in the cache


def default_threads() -> int:
    """torch threads when ``--threads`` is not given: half the logical cores, as the GGUF backend.

    Measured on 2 cores (SmolLM2-135M, fp32, docs/performance.md): on an idle machine 2 threads
    decode faster (25.9 tok/s through HTTP against 17.0 with 1), but when anything else wants the
    cores (the HTTP client, another process) OpenMP's busy-waiting threads collapse to about
    1 tok/s, while 1 thread keeps 11 to 16."""
    return max(1, (os.cpu_count() or 1) // 2)


def _cache_layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise EngineError("this transformers version has no per-layer cache (need transformers>=4.56)")
    return layers


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class BatchEngine:
    """Generates up to ``parallel`` rows at once on one model, fed by a bounded queue."""

    def __init__(self, model: Any, device: torch.device, *, parallel: int, queue_size: int,
                 chunk: int, threads: int = 0, name: str = "model"):
        from transformers import DynamicCache

        self.model = model
        self.device = device
        self.parallel = max(1, parallel)
        self.queue_size = max(0, queue_size)
        self.chunk = max(16, chunk)
        self.threads = threads if threads > 0 else default_threads()
        self.name = name
        self._new_cache = DynamicCache
        params = inspect.signature(model.forward).parameters
        self._cache_arg = self.cache_argument(model)
        # logits_to_keep=1 spares the full-vocabulary logits of every prompt position during prefill.
        self._keep_arg = next((a for a in ("logits_to_keep", "num_logits_to_keep") if a in params), None)
        self.vocab = int(model.get_output_embeddings().weight.shape[0])
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._closed = False
        self._prefills: list[_Prefill] = []
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None      # [B, T] 1 for real tokens, 0 for left padding
        self._pos: torch.Tensor | None = None       # [B] position of each row's next token
        self._next: torch.Tensor | None = None      # [B] token each row feeds next
        self.steps = 0                              # decode steps run (for tests and benchmarks)
        self.max_rows = 0                           # most rows seen in one step
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"shimmy-engine-{name}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    @staticmethod
    def cache_argument(model: Any) -> str:
        """The name ``forward`` takes the key/value cache under (transformers 5 renamed it)."""
        params = inspect.signature(model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    # ------------------------------------------------------------ request side
    def stats(self) -> dict[str, int]:
        with self._cv:
            return {"busy_slots": len(self._rows) + len(self._prefills), "queued": len(self._waiting)}

    def submit(self, jobs: list[Job]) -> None:
        """Queue every choice of a request, or refuse them all with :class:`Overloaded`."""
        with self._cv:
            if self._closed:
                raise EngineError(f"model {self.name!r} was unloaded")
            self._drop_cancelled_waiting()  # requests that gave up waiting hold no place
            check_room(len(self._waiting), len(self._rows) + len(self._prefills), self.parallel, len(jobs),
                       self.queue_size)
            self._waiting.extend(jobs)
            self._cv.notify()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------ the engine thread
    def _warm_up(self) -> None:
        """One token through the model, so that the first request pays neither for weights still to be
        paged in from a memory-mapped file nor for first-use kernel setup (this counts as loading)."""
        ids = torch.tensor([[0]], dtype=torch.long, device=self.device)
        self.model(input_ids=ids, use_cache=True, **{self._cache_arg: self._new_cache()})

    def _run(self) -> None:
        # Every forward pass runs on this thread, warm-up included: under OpenMP the intra-op thread
        # pool belongs to the thread that uses it, and a model that has also run on another thread
        # decodes about 35% slower on a 2-core machine (16 against 25 tok/s, SmolLM2-135M).
        torch.set_num_threads(self.threads)
        if self.device.type == "cuda":
            # cuDNN's attention builds an execution plan for every new shape, and decoding makes a new
            # shape every step (the cache grows by one): measured on an H200 it held a 24-layer model to
            # 15 tok/s. The flash and memory-efficient kernels need no plan. (A process-wide switch:
            # nothing else in a Shimmy server runs torch.)
            torch.backends.cuda.enable_cudnn_sdp(False)
        with torch.inference_mode():
            try:
                self._warm_up()
            except Exception as exc:
                self._start_error = EngineError(f"the model failed its first forward pass: {type(exc).__name__}: {exc}")
                self._closed = True
            finally:
                self._ready.set()
            while not self._closed:
                with self._cv:
                    self._drop_cancelled_waiting()
                    while not self._closed and not self._waiting and not self._rows and not self._prefills:
                        self._cv.wait(_IDLE_WAIT_S)
                        self._drop_cancelled_waiting()
                    if self._closed:
                        break
                    while self._waiting and len(self._rows) + len(self._prefills) < self.parallel:
                        job = self._waiting.popleft()
                        job.ticket.admitted.set()
                        self._prefills.append(_Prefill(job, self._new_cache()))
                try:
                    if self._prefills:
                        self._prefill_chunk()
                    if self._rows:
                        self._step()
                except Exception as exc:  # the model failed: fail every row, keep serving
                    self._fail_all(exc)
        self._fail_all(EngineError(f"model {self.name!r} was unloaded"), waiting=True)

    def _drop_cancelled_waiting(self) -> None:
        if any(job.cancelled for job in self._waiting):
            self._waiting = collections.deque(j for j in self._waiting if not j.cancelled)

    def _fail_all(self, exc: Exception, waiting: bool = False) -> None:
        error = exc if isinstance(exc, BackendError) else EngineError(
            f"generation failed: {type(exc).__name__}: {exc}")
        if not isinstance(exc, BackendError):
            print(f"shimmy: {self.name}: {error}", file=sys.stderr, flush=True)
        jobs = [r.job for r in self._rows] + [p.job for p in self._prefills]
        if waiting:
            with self._cv:
                jobs += list(self._waiting)
                self._waiting.clear()
        for ticket in {id(job.ticket): job.ticket for job in jobs}.values():
            ticket.put(None, ("error", error))
        self._rows, self._prefills = [], []
        self._cache = self._mask = self._pos = self._next = None

    def _forward(self, ids: torch.Tensor, cache: Any, keep_last: bool = False, **kwargs: Any) -> torch.Tensor:
        kwargs[self._cache_arg] = cache
        if keep_last and self._keep_arg:
            kwargs[self._keep_arg] = 1
        out = self.model(input_ids=ids, use_cache=True, **kwargs)
        return out.logits[:, -1, :]

    def _prefill_chunk(self) -> None:
        """Feed one chunk of the oldest admitted prompt; when it is all in, start its row."""
        pre = self._prefills[0]
        job = pre.job
        if job.cancelled or job.max_tokens <= 0:
            self._prefills.pop(0)
            if not job.cancelled:
                job.emit(("end", "length"))
            return
        end = min(len(job.tokens), pre.done + self.chunk)
        ids = torch.tensor([job.tokens[pre.done:end]], dtype=torch.long, device=self.device)
        logits = self._forward(ids, pre.cache, keep_last=True)
        pre.done = end
        if end < len(job.tokens):
            return
        self._prefills.pop(0)
        row = _Row(job, _Sampler(job.params, self.vocab))
        token = self._choose(row, logits[0].float().cpu())
        if token is not None:
            self._merge(row, pre.cache, len(job.tokens), token)

    def _choose(self, row: _Row, logits: torch.Tensor) -> int | None:
        """Sample the row's next token and report it; ``None`` when the row is finished."""
        job = row.job
        if job.cancelled:
            return None
        constraint = job.constraint
        try:
            token = row.sampler.sample(logits if constraint is None else constraint.mask(logits))
            row.sampler.accept(token)
            if token in job.eog:
                job.emit(("end", "stop"))
                return None
            complete = False
            if constraint is not None:
                constraint.advance(token)
                complete = constraint.finished
        except BackendError as exc:  # the choice's matcher failed: end its request, keep the others
            job.emit(("error", exc))
            return None
        row.generated += 1
        logprob, top = None, ()
        if job.params.logprobs:
            lp = torch.log_softmax(logits.double(), dim=-1)
            logprob = float(lp[token])
            n = min(job.params.top_logprobs, lp.numel())
            if n:
                values, ids = torch.topk(lp, n)
                top = tuple(zip(ids.tolist(), values.tolist()))
        job.emit(("token", token, logprob, top))
        if complete:  # the output format allows nothing but the end
            job.emit(("end", "stop"))
            return None
        if row.generated >= job.max_tokens:
            job.emit(("end", "length"))
            return None
        return token

    def _merge(self, row: _Row, cache: Any, length: int, token: int) -> None:
        dev = self.device
        mask = torch.ones((1, length), dtype=torch.long, device=dev)
        pos = torch.tensor([length], dtype=torch.long, device=dev)
        nxt = torch.tensor([token], dtype=torch.long, device=dev)
        if not self._rows:
            self._cache, self._mask, self._pos, self._next = cache, mask, pos, nxt
            self._rows = [row]
            return
        width = max(self._mask.shape[1], length)
        for mine, theirs in zip(_cache_layers(self._cache), _cache_layers(cache)):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)])
        self._pos = torch.cat([self._pos, pos])
        self._next = torch.cat([self._next, nxt])
        self._rows.append(row)

    def _step(self) -> None:
        """One decode step over every running row."""
        self._keep([i for i, r in enumerate(self._rows) if not r.job.cancelled])
        if not self._rows:
            return
        batch = len(self._rows)
        self._mask = torch.cat([self._mask, self._mask.new_ones((batch, 1))], dim=1)
        logits = self._forward(self._next[:, None], self._cache, attention_mask=self._mask,
                               position_ids=self._pos[:, None])
        self._pos += 1
        self.steps += 1
        self.max_rows = max(self.max_rows, batch)
        logits = logits.float().cpu()
        keep, tokens = [], []
        for i, row in enumerate(self._rows):
            token = self._choose(row, logits[i])
            if token is not None:
                keep.append(i)
                tokens.append(token)
        if tokens:
            self._next[keep] = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        """Drop the rows not in ``keep`` and the padding columns no remaining row needs."""
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows = []
            self._cache = self._mask = self._pos = self._next = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask, self._pos, self._next = self._mask[index], self._pos[index], self._next[index]
        lead = int(self._mask.argmax(dim=1).min())  # leading columns that are padding in every row
        for layer in _cache_layers(self._cache):
            layer.keys = layer.keys[index, :, lead:, :]
            layer.values = layer.values[index, :, lead:, :]
        self._mask = self._mask[:, lead:]
