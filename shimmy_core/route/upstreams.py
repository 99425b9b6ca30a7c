"""The upstreams of a front: where each is, what it serves, how loaded it is and whether it is
taking requests.

An upstream is ``up`` (takes requests), ``ejected`` (failed: a connection error, a 5xx, a failed
health check; it is left alone until its backoff passes, then a health check re-admits it) or
``starting`` (never answered yet).  Requests eject at once (a connection error, a 5xx); health
checks after ``FAILED_CHECKS`` failures in a row.  The backoff doubles with each ejection in a row, from
``BACKOFF_S`` to ``MAX_BACKOFF_S``, and resets on the first success.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

FAILED_CHECKS = 2     # health checks failed in a row that eject an upstream (a busy one may be slow once)
UP, EJECTED, STARTING = "up", "ejected", "starting"


class BadUpstream(ValueError):
    """An ``--upstream`` that is not an ``http://host[:port]`` URL."""


def parse_upstream(url: str) -> tuple[str, int, str]:
    """``http://host:port[/prefix]`` -> ``(host, port, prefix)``; anything else is refused by name."""
    parts = urlsplit(url.strip())
    if parts.scheme != "http" or not parts.hostname:
        raise BadUpstream(f"--upstream {url!r}: expected http://HOST[:PORT], e.g. http://10.0.0.5:11435 "
                          "(https upstreams are not supported; put them behind a local TLS proxy)")
    try:
        port = parts.port or 80
    except ValueError:
        raise BadUpstream(f"--upstream {url!r}: the port is not a number from 1 to 65535") from None
    if parts.query or parts.fragment:
        raise BadUpstream(f"--upstream {url!r}: no query or fragment, please")
    prefix = parts.path.rstrip("/")
    if prefix.endswith("/v1"):  # people paste the OpenAI base URL
        prefix = prefix[:-3]
    return parts.hostname, port, prefix


@dataclass
class Upstream:
    url: str
    key: str | None = None
    host: str = ""
    port: int = 0
    prefix: str = ""
    state: str = STARTING
    shimmy: bool = False               # answers Shimmy's /health (per-model slots and queue)
    models: frozenset = frozenset()    # ids from its /v1/models
    model_records: tuple = ()          # its /v1/models entries, for the union
    slots: int = 0                     # Shimmy: the slots of its loaded models (0: unknown)
    busy: int = 0
    queued: int = 0
    outstanding: int = 0               # this front's requests on it now
    requests: int = 0
    errors: int = 0
    ejections: int = 0
    backoff: float = BACKOFF_S
    ejected_until: float = 0.0
    last_error: str | None = None
    failed_checks: int = 0             # health checks failed in a row
    latency_counts: list = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def __post_init__(self) -> None:
        self.host, self.port, self.prefix = parse_upstream(self.url)

    def serves(self, model: str | None) -> bool:
        return model is None or not self.models or model in self.models

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def describe(self) -> dict:
        """What the front's ``/health`` shows of it."""
        return {"url": self.url, "state": self.state, "models": sorted(self.models), "outstanding": self.outstanding,
                "slots": self.slots, "busy_slots": self.busy, "queued": self.queued, "requests": self.requests,
                "errors": self.errors, "ejections": self.ejections, "last_error": self.last_error}


class Pool:
    """The upstreams, their locks and the health-check thread."""

    def __init__(self, upstreams: list[Upstream], *, interval: float = 2.0, timeout: float = 3.0):
        self.upstreams = upstreams
        self.interval = interval
        self.timeout = timeout
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ passive checks
    def failed(self, upstream: Upstream, reason: str) -> None:
        """A connection error or a 5xx: count it and eject the upstream for its backoff."""
        with self.lock:
            upstream.errors += 1
            upstream.last_error = reason
            if upstream.state == UP:
                self._eject(upstream)

    def _eject(self, upstream: Upstream) -> None:
        upstream.state = EJECTED
        upstream.ejections += 1
        upstream.ejected_until = time.monotonic() + upstream.backoff
        upstream.backoff = min(MAX_BACKOFF_S, upstream.backoff * 2)

    def answered(self, upstream: Upstream, seconds: float, status: int) -> None:
        """An answer came back: note the latency; below 500, the backoff starts over."""
        with self.lock:
            if status < 500:
                upstream.backoff = BACKOFF_S
            upstream.latency_sum += seconds
            index = next((i for i, edge in enumerate(LATENCY_BUCKETS) if seconds <= edge), len(LATENCY_BUCKETS))
            upstream.latency_counts[index] += 1

    # ------------------------------------------------------------ active checks
    def check(self, upstream: Upstream) -> None:
        """Ask ``/health`` (Shimmy) and ``/v1/models``; a failure ejects, a success re-admits an
        upstream whose backoff has passed."""
        if upstream.state == EJECTED and time.monotonic() < upstream.ejected_until:
            return
        try:
            status, health = self._get(upstream, "/health")
            shimmy = status in (200, 503) and isinstance(health, dict) and "models" in health and "status" in health
            if shimmy and status == 503:
                raise OSError(f"/health says {health.get('status')!r}")
            status, listing = self._get(upstream, "/v1/models")
            if status != 200 or not isinstance(listing, dict):
                raise OSError(f"/v1/models answered {status}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            with self.lock:
                upstream.last_error = f"health check: {exc}"
                upstream.failed_checks += 1
                if upstream.state == UP and upstream.failed_checks >= FAILED_CHECKS:
                    upstream.errors += 1
                    self._eject(upstream)
                elif upstream.state == EJECTED:
                    upstream.ejected_until = time.monotonic() + upstream.backoff
                    upstream.backoff = min(MAX_BACKOFF_S, upstream.backoff * 2)
            return
        records = tuple(m for m in listing.get("data") or () if isinstance(m, dict) and isinstance(m.get("id"), str))
        stats = [m for m in health.get("models") or () if isinstance(m, dict)] if shimmy else []
        with self.lock:
            upstream.shimmy = shimmy
            upstream.model_records = records
            upstream.models = frozenset(m["id"] for m in records)
            upstream.slots = sum(int((m.get("placement") or {}).get("slots") or 0) for m in stats)
            upstream.busy = sum(int(m.get("busy_slots") or 0) for m in stats)
            upstream.queued = sum(int(m.get("queued") or 0) for m in stats)
            upstream.state = UP
            upstream.failed_checks = 0
            upstream.last_error = None if upstream.errors == 0 else upstream.last_error

    def _get(self, upstream: Upstream, path: str) -> tuple[int, object]:
        conn = upstream.connect(self.timeout)
        try:
            conn.request("GET", upstream.prefix + path, headers=upstream.headers())
            resp = conn.getresponse()
            raw = resp.read(4 * 1024 * 1024)
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, None
        finally:
            conn.close()

    def check_all(self) -> None:
        threads = [threading.Thread(target=self.check, args=(u,), daemon=True) for u in self.upstreams]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout * 3)

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.interval):
                self.check_all()

        self.check_all()
        self._thread = threading.Thread(target=loop, name="shimmy-route-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------ views
    def models(self) -> list[dict]:
        """The union of the upstreams' ``/v1/models`` entries (the first seen of each id)."""
        seen: dict[str, dict] = {}
        with self.lock:
            for upstream in self.upstreams:
                if upstream.state == UP:
                    for record in upstream.model_records:
                        seen.setdefault(record["id"], record)
        return list(seen.values())
