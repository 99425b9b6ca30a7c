"""What a model load shows on stderr while it runs (``shimmy run``, ``probe`` and ``serve`` alike).

A :class:`LoadProgress` is the ``progress`` callable a backend's ``load`` receives: the backend
calls it with the fraction loaded (0.0 to 1.0) and knows nothing of terminals.  A load that ends
within a second (``SHIMMY_PROGRESS_AFTER`` seconds) shows nothing.  A longer one shows, on a
terminal, a bar with the percentage and the time so far, redrawn in place and replaced at the
end by one line; elsewhere (a log file, a pipe, ``serve`` under a supervisor) only that one line,
written whole at the end so that it never splits another log line.  While the bar is on the
terminal, lines others write to stderr (a backend's note through ``sys.stderr``, ``serve``'s log
through its ``logging`` handler) clear it first and it is drawn again under them::

    shimmy: loading SmolLM2 (105 MB) ... done in 2.3 s
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, TextIO

if TYPE_CHECKING:  # pragma: no cover
    import logging

AFTER_S = 1.0      # loads shorter than this show nothing (SHIMMY_PROGRESS_AFTER)
REDRAW_S = 0.1     # how often the bar is redrawn
WIDTH = 30         # the bar's width in characters

# One bar on the terminal at a time: a second load running meanwhile reports as a line.
_TERMINAL = threading.Lock()


def threshold(environ=os.environ) -> float:
    """Seconds a load runs before it shows anything: ``SHIMMY_PROGRESS_AFTER``, else 1."""
    try:
        return max(0.0, float(environ.get("SHIMMY_PROGRESS_AFTER", AFTER_S)))
    except ValueError:
        return AFTER_S


def bar(what: str, fraction: float, seconds: float, width: int = WIDTH) -> str:
    """The bar's text: ``loading X [#######.......]  45%  2.1 s``."""
    filled = round(width * fraction)
    return f"shimmy: loading {what} [{'#' * filled}{'.' * (width - filled)}] {fraction * 100:3.0f}%  {seconds:.1f} s"


class LoadProgress:
    """Progress of one load, as a context manager around it; call the object with fractions.

    ``stream`` (stderr), ``tty`` (whether it is a terminal: by default, ask it), ``after``
    (:func:`threshold`) and ``clock`` are for tests; so is ``redraw``: False draws only when
    :meth:`draw` is called, instead of from a thread every :data:`REDRAW_S` seconds."""

    def __init__(self, what: str, *, stream: TextIO | None = None, tty: bool | None = None,
                 after: float | None = None, clock: Callable[[], float] = time.monotonic, redraw: bool = True):
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.after = threshold() if after is None else after
        self.clock = clock
        self.fraction = 0.0
        self.started = clock()
        self.shown = False           # the bar is on the terminal now
        self._redraw = redraw
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._owns_terminal = False
        self._lock = threading.Lock()        # the bar and the lines others write take turns
        self._proxy: _ClearingStream | None = None
        self._handlers: list[logging.StreamHandler] = []   # log handlers pointed at the proxy meanwhile
        self._mid_line = False               # another writer's line is not finished: no bar yet
        self._fd: int | None = None          # the terminal, whatever descriptor 2 points at meanwhile

    def __call__(self, fraction: float) -> None:
        """Record progress (from the loading thread, or a callback of the inference library)."""
        try:
            fraction = float(fraction)
        except (TypeError, ValueError):
            return
        if fraction == fraction:  # not NaN
            self.fraction = min(1.0, max(self.fraction, fraction))

    def __enter__(self) -> "LoadProgress":
        self.started = self.clock()
        if self.tty:
            self._owns_terminal = _TERMINAL.acquire(blocking=False)
            self.tty = self._owns_terminal
        if self.tty:
            # The bar goes to its own copy of the terminal's descriptor: an inference library
            # that silences stderr during the load (llama.cpp points descriptor 2 at /dev/null
            # for as long as the weights load) would otherwise swallow the bar it is meant to show.
            self._fd = _dup(self.stream)
        if self.tty and self.stream is sys.stderr:
            self._proxy = sys.stderr = _ClearingStream(self.stream, self)
            self._handlers = _stream_handlers(self.stream)
            for handler in self._handlers:
                handler.setStream(self._proxy)
        if self.tty and self._redraw:
            self._thread = threading.Thread(target=self._draw_until_done, name="shimmy-load-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.finish(ok=exc is None)

    def _draw_until_done(self) -> None:
        self.draw()         # at once when ``after`` is 0
        while not self._done.wait(REDRAW_S):
            self.draw()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def draw(self) -> None:
        """On a terminal, once the load has taken longer than ``after``: the bar, in place."""
        if not self.tty or self._done.is_set():
            return
        seconds = self.elapsed()
        if seconds < self.after:
            return
        with self._lock:
            if self._mid_line:
                return
            self._write(f"\r{bar(self.what, self.fraction, seconds)}\x1b[K")
            self.shown = True

    def clear(self) -> None:
        """Take the bar off the terminal (with the lock held); the next draw puts it back."""
        if self.shown:
            self._write("\r\x1b[K")
            self.shown = False

    def finish(self, ok: bool = True) -> None:
        """The load ended: the one line (if it took longer than ``after``) in place of the bar."""
        if self._done.is_set():
            return
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self._proxy is not None and sys.stderr is self._proxy:
                sys.stderr = self.stream
            for handler in self._handlers:
                if handler.stream is self._proxy:
                    handler.setStream(self.stream)
            seconds = self.elapsed()
            with self._lock:
                if seconds >= self.after or self.shown:
                    outcome = f"done in {seconds:.1f} s" if ok else f"failed after {seconds:.1f} s"
                    self.clear()
                    self._write(f"shimmy: loading {self.what} ... {outcome}\n")
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._owns_terminal:
                self._owns_terminal = False
                _TERMINAL.release()

    def _write(self, text: str) -> None:
        try:
            self.stream.flush()     # what others wrote first shows first
            if self._fd is None:
                self.stream.write(text)
                self.stream.flush()
                return
            data = text.encode(getattr(self.stream, "encoding", None) or "utf-8", "replace")
            while data:
                data = data[os.write(self._fd, data):]
        except (OSError, ValueError):  # stderr closed or gone: a load never fails for its display
            pass


class _ClearingStream:
    """``sys.stderr`` while a bar is on it: what others write clears the bar's line first."""

    def __init__(self, stream: TextIO, progress: LoadProgress):
        self._stream = stream
        self._progress = progress

    def write(self, text: str) -> int:
        with self._progress._lock:
            self._progress.clear()
            if text:
                self._progress._mid_line = not text.endswith("\n")
            return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _stream_handlers(stream: TextIO) -> list[logging.StreamHandler]:
    """The log handlers that write to ``stream``, attached to a logger or behind another handler
    (``target``: a handler that writes from a thread, a memory handler)."""
    import logging

    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    found: list[logging.StreamHandler] = []
    for logger in loggers:
        for handler in list(logger.handlers):
            while handler is not None:
                if isinstance(handler, logging.StreamHandler) and handler.stream is stream and handler not in found:
                    found.append(handler)
                handler = getattr(handler, "target", None)
    return found


def _dup(stream) -> int | None:
    """A new descriptor for the stream's file, or None when it has none (a StringIO in a test)."""
    try:
        return os.dup(stream.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False
