"""The chunk iterators that flow from a backend to a dialect hold a model slot until they are
closed: :func:`close` closes one, whatever it is (a generator, a list, a file-like body).
:func:`with_heartbeat` lets a stream say it is alive while the model is busy (a long prompt)."""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
BEAT = None  # what with_heartbeat yields when nothing came for a while
_END = object()


def close(stream: object) -> None:
    """Call ``stream.close()`` when it has one (generators do; lists and tuples do not)."""
    closer = getattr(stream, "close", None)
    if closer is not None:
        closer()


def with_heartbeat(items: Iterable[T], interval: float) -> Iterator[T | None]:
    """``items``, with :data:`BEAT` (None) yielded whenever ``interval`` seconds pass without one:
    a streaming dialect turns beats into keep-alive events, so that clients with an idle timeout
    wait through a long prompt.  ``items`` are read on a helper thread, which also closes them (a
    generator cannot be closed from another thread while it runs): when this iterator is closed
    (the client went away) the helper stops after the item it is waiting for, which the run's own
    cancellation makes short.  An exception of ``items`` is raised here."""
    handoff: queue.Queue = queue.Queue()
    stop = threading.Event()

    def pump() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                handoff.put((item, None))
        except BaseException as exc:  # handed over, raised in the reader's thread
            handoff.put((_END, exc))
            return
        finally:
            close(items)
        handoff.put((_END, None))

    def read() -> Iterator[T | None]:
        try:
            while True:
                try:
                    item, error = handoff.get(timeout=interval)
                except queue.Empty:
                    yield BEAT
                    continue
                if item is _END:
                    if error is not None:
                        raise error
                    return
                yield item
        finally:
            stop.set()

    # Started at once: from here on the helper owns ``items`` and closes them, read or not.
    threading.Thread(target=pump, name="shimmy-heartbeat", daemon=True).start()
    return read()
