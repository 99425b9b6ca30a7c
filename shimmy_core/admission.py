"""Admission of a request's choices into a batching engine's slots, the same for every backend:
refuse at once when the queue is full, then wait for a slot until the client goes or the queue
timeout passes.  Both refusals are :class:`Overloaded` (503 with ``Retry-After``) and come
before any output, so a client can retry safely."""

from __future__ import annotations

import threading
import time
from typing import Callable

from shimmy_core.contract.generation import Overloaded


def check_room(waiting: int, busy: int, slots: int, asking: int, queue_size: int) -> None:
    """Raise :class:`Overloaded` unless ``asking`` more jobs fit the free slots and the queue."""
    free = max(0, slots - busy)
    if waiting + asking - free > queue_size:
        raise Overloaded(f"The server is busy: {busy} requests are generating and {waiting} are waiting. "
                         "Retry shortly.", retry_after=1.0)


def await_slot(admitted: threading.Event, cancelled: Callable[[], bool], give_up: Callable[[], None],
               timeout: float, poll: float) -> None:
    """Wait until ``admitted`` is set.  When ``cancelled()`` turns true, call ``give_up()`` and
    return (the engine ends the jobs); past ``timeout`` seconds, call ``give_up()`` and raise
    :class:`Overloaded` with ``timed_out``."""
    deadline = time.monotonic() + timeout
    while not admitted.wait(poll):
        if cancelled():
            give_up()
            return
        if time.monotonic() > deadline:
            give_up()
            raise Overloaded(f"The request waited {timeout:.0f} s for a free slot.", retry_after=1.0, timed_out=True)


class Turnstile:
    """Admission for work that runs ``slots`` at a time without an engine of its own (embedding
    and rerank requests): past the slots a request waits in the queue; a full queue, or a wait
    past ``timeout`` seconds, is :class:`Overloaded`, refused before the work starts."""

    def __init__(self, slots: int, queue_size: int, timeout: float, poll: float = 0.05):
        self.slots = max(1, slots)
        self.queue_size = queue_size
        self.timeout = timeout
        self.poll = poll
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)
        self._busy = 0
        self._waiting = 0

    def enter(self, cancelled: Callable[[], bool] = lambda: False) -> bool:
        """Take a slot (True), or give up when ``cancelled()`` turns true while waiting (False)."""
        with self._lock:
            if self._busy < self.slots and not self._waiting:
                self._busy += 1
                return True
            check_room(self._waiting, self._busy, self.slots, 1, self.queue_size)
            self._waiting += 1
            deadline = time.monotonic() + self.timeout
            try:
                while self._busy >= self.slots:
                    if cancelled():
                        return False
                    if time.monotonic() > deadline:
                        raise Overloaded(f"The request waited {self.timeout:.0f} s for a free slot.",
                                         retry_after=1.0, timed_out=True)
                    self._free.wait(self.poll)
                self._busy += 1
                return True
            finally:
                self._waiting -= 1

    def leave(self) -> None:
        with self._lock:
            self._busy -= 1
            self._free.notify()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"busy_slots": self._busy, "queued": self._waiting}
