"""Serve the app with waitress, bound to loopback unless told otherwise, and
shut down gracefully on SIGTERM/SIGINT: ``/health`` turns 503 at once, new and
queued requests get 503 with ``Retry-After``, running requests get the grace
period to finish (then a stream ends with an error event and ``[DONE]``), the
answers in flight are flushed, caches and models close, and the exit code is 0."""

from __future__ import annotations

import gc
import logging
import queue
import signal
import sys
import threading
import time
from typing import Callable

from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError

from shimmy_core.app import Shimmy, create_app

# Waitress answers bodies over its own limit in plain text before the app runs: keep its limit
# well above the app's, so that every ordinary 413 is the app's, in OpenAI JSON.  The same goes
# for headers (the app answers 431 in JSON).
_WAITRESS_BODY_FACTOR = 16
_WAITRESS_HEADER_FACTOR = 4


class StrictRequestParser(HTTPRequestParser):
    """waitress's parser, refusing request smuggling: a request that carries both
    ``Transfer-Encoding`` and ``Content-Length`` gets 400 and its connection is closed, with
    anything pipelined after it unread (RFC 9112 section 6.3).  waitress alone would read the
    chunked body and then answer whatever follows it on the connection."""

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        # waitress pops Transfer-Encoding from HTTP/1.1 headers once it has set ``chunked``.
        if (self.chunked or "TRANSFER_ENCODING" in self.headers) and "CONTENT_LENGTH" in self.headers:
            raise ParsingError("A request may not carry both Transfer-Encoding and Content-Length")


class StrictChannel(HTTPChannel):
    parser_class = StrictRequestParser


# Threads beyond the admitted requests, so that /health and quick refusals (503, 4xx)
# are answered while every slot streams and the queue is full.
_HEADROOM_THREADS = 8
# Open connections per worker thread: the others wait in waitress's queue, holding no thread.
_CONNECTIONS_PER_THREAD = 4
# After the grace period, time for the final error events and [DONE] to reach the clients.
_FLUSH_S = 3.0
_LOOP_S = 0.25


def server_threads(settings) -> int:
    """Every admitted request (running or queued) holds a waitress thread for its whole life."""
    return max(settings.server_threads, settings.parallel + settings.queue_size + _HEADROOM_THREADS)


def server_connections(settings) -> int:
    """The most open connections: a few per thread (keep-alive clients, slow senders, refusals)."""
    return server_threads(settings) * _CONNECTIONS_PER_THREAD


def make_server(shimmy: Shimmy):
    from waitress.server import create_server

    settings = shimmy.settings
    threads = server_threads(settings)
    timeout = max(1, round(settings.client_timeout))
    # Bodies up to the app's limit stay in memory (waitress spills larger ones to a temporary file),
    # and so does output up to waitress's back-pressure mark: conversations are not written to disk.
    in_memory = settings.max_body_bytes + settings.max_header_bytes + 65536
    server = create_server(
        create_app(shimmy),
        host=settings.host,  # always explicit: waitress alone would listen on every interface
        port=settings.port,
        threads=threads,
        connection_limit=server_connections(settings),
        channel_timeout=timeout,  # idle or half-sent requests; a request being served is never reaped
        cleanup_interval=max(1, min(30, timeout // 2)),
        channel_request_lookahead=5,  # lets a stream notice a vanished client
        max_request_body_size=settings.max_body_bytes * _WAITRESS_BODY_FACTOR,
        max_request_header_size=settings.max_header_bytes * _WAITRESS_HEADER_FACTOR,
        inbuf_overflow=in_memory,
        outbuf_overflow=16 * 1024 * 1024,
        outbuf_high_watermark=16 * 1024 * 1024,
        clear_untrusted_proxy_headers=True,
        ident="shimmy",
    )
    server.channel_class = StrictChannel
    return server


# ------------------------------------------------------------------ logging
class BackgroundHandler(logging.Handler):
    """Hands records to a thread that writes them, so that a slow or stuck stderr (a full pipe)
    never stalls a request; past ``capacity`` waiting records, new ones are dropped."""

    def __init__(self, target: logging.Handler, capacity: int = 10000):
        super().__init__()
        self.target = target
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="shimmy-log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.msg, record.args = record.getMessage(), None  # format now, in the caller's thread
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
        except Exception:  # pragma: no cover
            self.handleError(record)

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            self.target.handle(record)

    def close(self, timeout: float = 1.0) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # pragma: no cover
            pass
        self._thread.join(timeout)
        super().close()


def configure_logging() -> BackgroundHandler | None:
    """Shimmy's log (one line per request, warnings) on stderr, unless the embedding program
    configured the ``shimmy`` logger itself."""
    logger = logging.getLogger("shimmy")
    if logger.handlers:
        return None
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler = BackgroundHandler(stream)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler


# ------------------------------------------------------------------ serving and draining
def _flushed(server) -> bool:
    """No connection has a request running or bytes waiting to be sent."""
    for channel in list(server._map.values()):
        if getattr(channel, "requests", None) or getattr(channel, "total_outbufs_len", 0):
            return False
    return True


WARM_UP_AFTER_S = 1.0


def on_stop_signals(lifecycle, name: str = "shimmy") -> None:
    """SIGTERM and SIGINT begin the drain (a second one ends the grace period at once)."""
    def stop(signum, frame):
        again = lifecycle.draining
        lifecycle.begin_drain()
        if not again:
            print(f"{name}: shutting down: {lifecycle.active} request(s) in flight get up to "
                  f"{lifecycle.grace:g} s", file=sys.stderr, flush=True)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


def run_until_drained(server, lifecycle) -> None:
    """Serve until a drain begins, then keep serving while running requests finish (or end at the
    deadline) and refusals go out; then stop the worker threads and close every connection."""
    def loop(timeout: float) -> None:
        server.asyncore.loop(timeout=timeout, map=server._map, use_poll=server.adj.asyncore_use_poll, count=1)

    try:
        while not lifecycle.draining:
            loop(_LOOP_S)
        hard_stop = lifecycle.deadline() + _FLUSH_S
        while time.monotonic() < hard_stop and not (lifecycle.active == 0 and _flushed(server)):
            loop(0.05)
    except KeyboardInterrupt:  # not the main thread's handler: stop at once
        pass
    finally:
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=2)
        from waitress import wasyncore

        wasyncore.close_all(server._map, ignore_all=True)


def release_logging(log_handler: BackgroundHandler | None) -> None:
    if log_handler is not None:
        logging.getLogger("shimmy").removeHandler(log_handler)
        log_handler.close()


def serve(shimmy: Shimmy, announce: Callable[[str], None] = print) -> int:
    log_handler = configure_logging()
    server = make_server(shimmy)
    gc.freeze()  # what the start built lives as long as the server: later collections skip it
    gc.enable()  # (cmd_serve turned collection off for the start)
    lifecycle = shimmy.lifecycle
    shimmy.cache.open()
    on_stop_signals(lifecycle)
    host = shimmy.settings.host
    shown = f"[{host}]" if ":" in host else host
    announce(f"Shimmy is listening on http://{shown}:{server.effective_port}/v1")  # after the handlers
    # A second later: started at once, it would compete for the GIL with the first answers (a
    # client polling /health for readiness got its 200 about 25 ms later, bench/ready_bench.py).
    warm_up = threading.Timer(WARM_UP_AFTER_S, shimmy.warm_up)
    warm_up.daemon = True
    warm_up.name = "shimmy-warm-up"
    warm_up.start()
    try:
        run_until_drained(server, lifecycle)
    finally:
        shimmy.close()
        print("shimmy: stopped", file=sys.stderr, flush=True)
        release_logging(log_handler)
    return 0
