"""Stop strings over streamed text: text that could be the start of a stop
string is held back until it is known not to be, so a stop sequence never
reaches the client and streamed output equals non-streamed output."""

from __future__ import annotations

from typing import Iterable


class StopScanner:
    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False
        self.hit: str | None = None   # the stop string found, once stopped

    def feed(self, text: str) -> tuple[str, bool]:
        """Add generated text; return ``(text safe to emit, whether a stop string was hit)``."""
        if self.stopped:
            return "", True
        buf = self.held + text
        if not self.stops:
            self.held = ""
            return buf, False
        hits = [(i, -len(s), s) for s, i in ((s, buf.find(s)) for s in self.stops) if i >= 0]
        if hits:
            at, _, self.hit = min(hits)  # the earliest; of two starting there, the longer
            self.stopped, self.held = True, ""
            return buf[:at], True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text, once generation ended without a stop string."""
        out, self.held = self.held, ""
        return out
