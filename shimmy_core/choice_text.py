"""One choice's output as a backend produces it, the same steps in every backend: each token's
text decoded incrementally (a token may end inside a UTF-8 character), stop strings held back
until they can be told apart from text, logprobs attached to the text they belong to, and at
the end the held-back tail, the finish reason and the usage."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from shimmy_core.contract.generation import Chunk, Finish, TextDelta, TokenLogprob, Usage
from shimmy_core.stops import StopScanner


class ChoiceText:
    """``add()`` each generated token, ``finish()`` at the end; both return the chunks to pass on.

    ``decode(piece)`` turns what the backend has for a token (bytes, an id) into the text it
    completes; ``flush()`` returns what the decoder still holds.  ``cached`` is reported in the
    usage (prompt tokens whose KV cells were reused)."""

    def __init__(self, stop: Sequence[str], n_prompt: int, decode: Callable[[Any], str], flush: Callable[[], str]):
        self.scanner = StopScanner(stop)
        self.n_prompt = n_prompt
        self.cached = 0
        self.generated = 0
        self.done = False
        self._decode = decode
        self._flush = flush
        self._pending: list[TokenLogprob] = []

    def add(self, piece: Any, logprob: TokenLogprob | None = None) -> list[Chunk]:
        """One generated token; at a stop string the choice ends (``done``) with ``stop``."""
        self.generated += 1
        if logprob is not None:
            self._pending.append(logprob)
        out: list[Chunk] = []
        text, stopped = self.scanner.feed(self._decode(piece))
        if text or (self._pending and not stopped):
            out.append(TextDelta(text, tuple(self._pending)))
            self._pending = []
        if stopped:
            out += self.finish("stop")
        return out

    def finish(self, reason: str) -> list[Chunk]:
        """The end (end of generation, token limit, cancellation): the held-back text, then
        :class:`Finish` (``stop`` when the tail completes a stop string) and :class:`Usage`."""
        out: list[Chunk] = []
        if not self.scanner.stopped:
            tail, stopped = self.scanner.feed(self._flush())
            tail += self.scanner.flush()
            reason = "stop" if stopped else reason
            if tail or self._pending:
                out.append(TextDelta(tail, tuple(self._pending)))
        self._pending = []
        self.done = True
        stop = self.scanner.hit if reason == "stop" else None
        return out + [Finish(reason, stop), Usage(self.n_prompt, self.generated, self.cached)]
