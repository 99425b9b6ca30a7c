"""Serve the app with waitress, bound to loopback unless told otherwise, and
shut down cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable

from shimmy_core.app import Shimmy, create_app

# Waitress answers bodies over its own limit in plain text before the app runs: keep its limit
# well above the app's, so that every ordinary 413 is the app's, in OpenAI JSON.
_WAITRESS_BODY_FACTOR = 16


# Threads beyond the admitted requests, so that /health and quick refusals (503, 4xx)
# are answered while every slot streams and the queue is full.
_HEADROOM_THREADS = 8


def server_threads(settings) -> int:
    """Every admitted request (running or queued) holds a waitress thread for its whole life."""
    return max(settings.server_threads, settings.parallel + settings.queue_size + _HEADROOM_THREADS)


def make_server(shimmy: Shimmy):
    from waitress.server import create_server

    settings = shimmy.settings
    return create_server(
        create_app(shimmy),
        host=settings.host,  # always explicit: waitress alone would listen on every interface
        port=settings.port,
        threads=server_threads(settings),
        channel_request_lookahead=5,  # lets a stream notice a vanished client
        max_request_body_size=settings.max_body_bytes * _WAITRESS_BODY_FACTOR,
        clear_untrusted_proxy_headers=True,
        ident="shimmy",
    )


def serve(shimmy: Shimmy, announce: Callable[[str], None] = print) -> int:
    server = make_server(shimmy)
    host = shimmy.settings.host
    shown = f"[{host}]" if ":" in host else host
    announce(f"Shimmy is listening on http://{shown}:{server.effective_port}/v1")

    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    try:
        server.run()
    except KeyboardInterrupt:
        print("shimmy: shutting down", file=sys.stderr)
    finally:
        server.close()
        shimmy.close()
    return 0
