"""``shimmy route``: build the front from its flags, serve it with waitress, and drain on
SIGTERM/SIGINT (new requests get 503, running streams get the grace period, then local workers
stop).  ``shimmy serve --instances`` starts its workers here too (:func:`serve_instances`)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from shimmy_core.contract.settings import Settings
from shimmy_core.http.routes import RouteTable
from shimmy_core.lifecycle import Lifecycle
from shimmy_core.route.balancing import Balancer
from shimmy_core.route.proxy import Front, create_front_app
from shimmy_core.route.upstreams import BadUpstream, Pool, Upstream

DEFAULT_ROUTE_PORT = 11435
_HEADROOM_THREADS = 8


class RouteError(ValueError):
    """A flag the front cannot work with (a bad upstream URL, an upstream key for no upstream)."""


@dataclass
class RouteConfig:
    upstreams: list[str]
    host: str = "127.0.0.1"
    port: int = DEFAULT_ROUTE_PORT
    policy: str = "cache-aware"
    api_keys: tuple[str, ...] = ()
    upstream_keys: dict[str, str] = field(default_factory=dict)
    max_outstanding: int = 32
    epsilon: float = 0.25
    health_interval: float = 2.0
    grace: float = 10.0
    read_timeout: float = 600.0


def parse_upstream_keys(pairs: list[str], env: str | None) -> dict[str, str]:
    """``URL=KEY`` pairs from ``--upstream-key`` and ``SHIMMY_UPSTREAM_KEYS`` (comma-separated)."""
    keys: dict[str, str] = {}
    for pair in [*(p for p in (env or "").split(",") if p.strip()), *(pairs or [])]:
        url, sep, key = pair.strip().rpartition("=")
        if not sep or not url or not key:
            raise RouteError(f"upstream key {pair.split('=')[0]!r}...: expected URL=KEY")
        keys[url.rstrip("/")] = key
    return keys


def dialect_routes(settings: Settings) -> RouteTable:
    """A route table that knows the dialect plugins, so that the front's own errors leave in each
    path's envelope (their ``error_response``)."""
    from shimmy_core.plugin_manager import create_plugin_manager
    from shimmy_core.plugin_registry import build_registry

    pm = create_plugin_manager(settings.disable_plugins)
    routes = RouteTable()
    routes.dialects.update(build_registry(pm, settings).dialects)
    return routes


def build_front(config: RouteConfig, settings: Settings) -> tuple[Front, Pool]:
    if not config.upstreams:
        raise RouteError("give at least one --upstream URL")
    try:
        upstreams = [Upstream(url.rstrip("/"), config.upstream_keys.get(url.rstrip("/"))) for url in config.upstreams]
    except BadUpstream as exc:
        raise RouteError(str(exc)) from None
    unknown = set(config.upstream_keys) - {u.url for u in upstreams}
    if unknown:
        raise RouteError(f"--upstream-key for {', '.join(sorted(unknown))}, which is no --upstream")
    pool = Pool(upstreams, interval=config.health_interval)
    balancer = Balancer(pool, config.policy, epsilon=config.epsilon, max_outstanding=config.max_outstanding)
    front = Front(pool, balancer, dialect_routes(settings), Lifecycle(config.grace), api_keys=config.api_keys,
                  host=config.host, allowed_hosts=settings.allowed_hosts, read_timeout=config.read_timeout)
    return front, pool


def serve_front(config: RouteConfig, settings: Settings, announce: Callable[[str], None] = print,
                on_stopped: Callable[[], None] = lambda: None) -> int:
    from waitress.server import create_server

    from shimmy_core.http.server import StrictChannel, configure_logging, on_stop_signals, release_logging
    from shimmy_core.http.server import run_until_drained

    front, pool = build_front(config, settings)
    log_handler = configure_logging()
    threads = config.max_outstanding * len(pool.upstreams) + _HEADROOM_THREADS
    server = create_server(create_front_app(front), host=config.host, port=config.port, threads=threads,
                           connection_limit=threads * 4, channel_request_lookahead=5,
                           clear_untrusted_proxy_headers=True, ident="shimmy-route",
                           outbuf_high_watermark=16 * 1024 * 1024)
    server.channel_class = StrictChannel
    on_stop_signals(front.lifecycle, "shimmy route")
    pool.start()
    shown = f"[{config.host}]" if ":" in config.host else config.host
    announce(f"Upstreams: {', '.join(u.url for u in pool.upstreams)} (policy {config.policy})")
    announce(f"Shimmy route is listening on http://{shown}:{server.effective_port}/v1")
    try:
        run_until_drained(server, front.lifecycle)
    finally:
        pool.stop()
        on_stopped()
        print("shimmy route: stopped", file=sys.stderr, flush=True)
        release_logging(log_handler)
    return 0


# ------------------------------------------------------------------ shimmy serve --instances
def instance_count(value: str) -> int:
    """``N``, or ``auto``: one per GPU when there are GPUs, else half the cores (at least one)."""
    if value != "auto":
        count = int(value)
        if count < 1:
            raise RouteError("--instances must be at least 1 (or auto)")
        return count
    from shimmy_core.devices import detect

    gpus = [d for d in detect("") if d.name != "cpu"]
    return len(gpus) or max(1, (os.cpu_count() or 2) // 2)


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM when the front dies, even by SIGKILL (elsewhere: nothing)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


_WORKER_DROPPED = {"--host": 1, "--port": 1, "--instances": 1, "--threads": 1, "--api-key": 1, "--policy": 1,
                   "--max-outstanding": 1}


def worker_argv(argv: list[str]) -> list[str]:
    """The ``serve`` arguments a worker gets: the user's, less the front's own flags."""
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in _WORKER_DROPPED:
            skip = 0 if "=" in arg else _WORKER_DROPPED[name]
            continue
        out.append(arg)
    return out


def serve_instances(count: int, serve_args: list[str], config: RouteConfig, settings: Settings,
                    threads: int | None = None, announce: Callable[[str], None] = print) -> int:
    """Start ``count`` ``shimmy serve`` workers on free loopback ports, each with its share of the
    cores (``--threads``) and, when there are GPUs, its own GPU; serve the front over them; stop
    them with it.  The workers take a random key only the front knows."""
    key = secrets.token_urlsafe(24)
    cores = os.cpu_count() or 1
    share = threads or max(1, cores // count)
    from shimmy_core.devices import detect

    gpus = [d.name.split(":")[-1] for d in detect("") if d.name.startswith("cuda")]
    workers, urls = [], []
    for i in range(count):
        port = _free_port()
        env = {**os.environ, "SHIMMY_API_KEY": key}
        if gpus and len(gpus) >= count:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        cmd = [sys.executable, "-m", "shimmy_core", "serve", *serve_args, "--host", "127.0.0.1", "--port", str(port),
               "--threads", str(share)]
        workers.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        preexec_fn=_die_with_parent))
        urls.append(f"http://127.0.0.1:{port}")
    announce(f"Started {count} worker(s) with {share} thread(s) each: {', '.join(urls)}")
    config.upstreams = urls
    config.upstream_keys = {url: key for url in urls}

    def stop_workers() -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + config.grace + 5
        for worker in workers:
            try:
                worker.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

    try:
        return serve_front(config, settings, announce, on_stopped=stop_workers)
    finally:
        stop_workers()
