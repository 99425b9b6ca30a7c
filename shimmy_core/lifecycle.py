"""The server's life: serving, then draining on SIGTERM/SIGINT.

While it drains, ``/health`` answers 503, new requests and requests still
waiting for a slot get 503 with ``Retry-After``, and running requests have
``shutdown_grace`` seconds to finish; after that they end with an error (a
final SSE error event for a stream).  The middleware counts the requests in
flight so that the server knows when nothing is left to wait for.
"""

from __future__ import annotations

import threading
import time

from shimmy_core.contract.generation import Overloaded

# What a client refused during a shutdown is told to wait: about one restart.
RETRY_AFTER_SHUTDOWN_S = 5


class ShuttingDown(Overloaded):
    """The server is shutting down: a 503 with ``Retry-After`` (code ``shutting_down``)."""

    code = "shutting_down"

    def __init__(self, message: str = "The server is shutting down. Retry shortly."):
        super().__init__(message, retry_after=RETRY_AFTER_SHUTDOWN_S)


class Lifecycle:
    def __init__(self, grace: float):
        self.grace = max(0.0, grace)
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._active = 0

    # ------------------------------------------------------------ draining
    @property
    def draining(self) -> bool:
        return self._deadline is not None

    def begin_drain(self) -> None:
        """Start draining (again: end the grace period now)."""
        with self._cond:
            now = time.monotonic()
            self._deadline = now if self._deadline is not None else now + self.grace
            self._cond.notify_all()

    def expired(self) -> bool:
        """Whether the grace period is over: running requests must stop."""
        deadline = self._deadline
        return deadline is not None and time.monotonic() >= deadline

    def deadline(self) -> float | None:
        return self._deadline

    # ------------------------------------------------------------ requests in flight
    @property
    def active(self) -> int:
        return self._active

    def started(self) -> None:
        with self._cond:
            self._active += 1

    def finished(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()
