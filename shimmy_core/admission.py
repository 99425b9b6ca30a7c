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
