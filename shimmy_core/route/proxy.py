"""The front's Falcon app: ``/health``, ``/metrics``, the union of the models, and every other
path forwarded to an upstream, its answer streamed back chunk by chunk as it arrives.

Errors the front makes itself (no upstream serves the model, all are full, the key is wrong,
an upstream failed) leave in the envelope of the dialect that owns the path, through the
dialects' own ``error_response`` (:func:`shimmy_core.http.errors.install_error_handler`).

A request is retried once on another upstream when the first failed before any byte of its
answer reached the client: a connection error, a 5xx, or an answer that broke before its first
body byte (the front waits for that byte before it answers).  A stream that breaks later ends
with an error event in its dialect's framing and is not replayed.

A Responses API response is stored by the upstream that made it: the front remembers where
(the last 100,000 ids) and sends what continues it (``previous_response_id``) or reads it
(``/v1/responses/{id}``) there.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections import OrderedDict
from typing import Iterator
from urllib.parse import quote

import falcon

from shimmy_core import __version__
from shimmy_core.contract.dialect import HTTPRefusal
from shimmy_core.contract.generation import ModelNotFound
from shimmy_core.http.errors import install_error_handler
from shimmy_core.http.middleware import Auth, Draining, HostCheck
from shimmy_core.http.routes import RouteTable
from shimmy_core.lifecycle import RETRY_AFTER_SHUTDOWN_S, Lifecycle
from shimmy_core.route.balancing import Balancer, NoUpstream, conversation_key
from shimmy_core.route.upstreams import LATENCY_BUCKETS, UP, Pool, Upstream

# Hop-by-hop headers (RFC 9110 section 7.6.1) and those the front sets itself.
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
        "transfer-encoding", "upgrade", "host", "content-length", "expect"}
_RESPONSE_DROP = _HOP - {"content-length"} | {"server", "date"}
_CREDENTIALS = {"authorization", "x-api-key"}
_CHUNK = 65536
_STREAMING = ("text/event-stream", "application/x-ndjson")
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[^"]+)"')
_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d+)')
RETRY_AFTER_FULL_S = 1
_PINNED_RESPONSES = 100_000
_STORED_RESPONSE_PATH = re.compile(r"^/v1/responses/(resp_[^/]+)")


def _connection_tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in (value or "").split(",") if t.strip()}


def forwarded_headers(headers: dict[str, str], upstream: Upstream, front_has_keys: bool) -> dict[str, str]:
    """The client's headers, less the hop-by-hop ones; the client's key stays behind when the front
    checks keys itself or the upstream has its own."""
    drop = _HOP | _connection_tokens(headers.get("CONNECTION"))
    if front_has_keys or upstream.key:
        drop |= _CREDENTIALS
    out = {name: value for name, value in headers.items() if name.lower() not in drop}
    out.update(upstream.headers())
    return out


class Relay:
    """One answer being streamed back: the upstream's connection and what ends the stream well."""

    def __init__(self, front: "Front", upstream: Upstream, conn: http.client.HTTPConnection,
                 answer: http.client.HTTPResponse, path: str):
        self.front, self.upstream, self.conn, self.answer, self.path = front, upstream, conn, answer, path
        self.first = b""
        self.closed = False
        self._body: Iterator[bytes] | None = None
        front.lifecycle.started()

    def close(self) -> None:
        """Close the upstream's connection and count the request done (once; WSGI servers call this
        also for a body never iterated)."""
        if self._body is not None:
            self._body.close()
        if not self.closed:
            self.closed = True
            self.conn.close()
            self.front.balancer.release(self.upstream)
            self.front.lifecycle.finished()

    def __iter__(self) -> Iterator[bytes]:
        return self._body

    def stream(self, client_gone) -> "Relay":
        self._body = self.body(client_gone)
        return self

    def next_chunk(self) -> bytes:
        return self.answer.read1(_CHUNK)

    def streaming(self) -> bool:
        kind = (self.answer.getheader("Content-Type") or "").split(";")[0].strip().lower()
        return kind in _STREAMING

    def body(self, client_gone) -> Iterator[bytes]:
        """The answer's bytes as they come; a break ends a stream with the dialect's error event."""
        response_id, sequence = None, None
        try:
            chunk = self.first
            while chunk:
                if self.path.startswith("/v1/responses"):
                    if response_id is None:
                        response_id = next(iter(_RESPONSE_ID.findall(chunk)), b"").decode() or None
                        if response_id is not None:
                            self.front.pin(response_id, self.upstream)
                    sequence = ([int(s) for s in _SEQUENCE.findall(chunk)] or [sequence])[-1]
                yield chunk
                if client_gone():
                    return
                chunk = self.next_chunk()
        except (OSError, http.client.HTTPException) as exc:
            self.front.pool.failed(self.upstream, f"answer broke off: {exc!r}")
            if self.streaming():
                yield self.front.broken_stream_tail(self.path, self.upstream, exc, response_id, sequence)
        finally:
            self._body = None
            self.close()


class Front:
    """What the resources share: the upstreams, the balancer, the dialects and the drain state."""

    def __init__(self, pool: Pool, balancer: Balancer, routes: RouteTable, lifecycle: Lifecycle, *,
                 api_keys: tuple[str, ...] = (), host: str = "127.0.0.1", allowed_hosts: tuple[str, ...] = (),
                 max_body: int = 32 * 1024 * 1024,
                 connect_timeout: float = 3.0, read_timeout: float = 600.0):
        self.pool, self.balancer, self.routes, self.lifecycle = pool, balancer, routes, lifecycle
        self.api_keys = tuple(k for k in api_keys if k)
        self.host, self.allowed_hosts = host, allowed_hosts
        self.max_body = max_body
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._pins: OrderedDict[str, Upstream] = OrderedDict()   # stored response id -> its upstream
        self._pins_lock = threading.Lock()

    def pin(self, response_id: str, upstream: Upstream) -> None:
        """A Responses API response is stored where it was made: what continues it goes there."""
        with self._pins_lock:
            self._pins[response_id] = upstream
            while len(self._pins) > _PINNED_RESPONSES:
                self._pins.popitem(last=False)

    def pinned(self, req_path: str, body: dict) -> Upstream | None:
        stored = _STORED_RESPONSE_PATH.match(req_path)
        response_id = stored.group(1) if stored else body.get("previous_response_id")
        if not isinstance(response_id, str):
            return None
        with self._pins_lock:
            return self._pins.get(response_id)

    # ------------------------------------------------------------ forwarding
    def forward(self, req: falcon.Request, resp: falcon.Response, **_: str) -> None:
        raw = self._body(req)
        parsed = None
        if raw and "json" in (req.content_type or "application/json"):
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None   # the upstream answers the malformed body in its own words
        parsed = parsed if isinstance(parsed, dict) else {}
        model = parsed.get("model", parsed.get("name"))
        model = model if isinstance(model, str) and model else None
        key = conversation_key(parsed, model)
        target = quote(req.path, safe="/:@!$&'()*+,;=-._~%") + (f"?{req.query_string}" if req.query_string else "")

        upstream = self._acquire(model, key, (), self.pinned(req.path, parsed))
        relay, retried = None, False
        while relay is None:
            failure, relay = self._try(upstream, req, target, raw)
            if relay is not None and (relay.answer.status < 500 or retried):
                break
            if relay is not None:  # a 5xx: retry elsewhere if there is an elsewhere
                failure = f"answered {relay.answer.status}"
                if relay.answer.status != 503:    # 503 is a full queue, not a broken upstream
                    self.pool.failed(upstream, failure)
            try:
                other = None if retried else self.balancer.acquire(model, key, exclude=(upstream,))
            except NoUpstream:
                other = None
            if other is None:
                if relay is not None:
                    break
                raise HTTPRefusal(502, f"The upstream {upstream.url} failed: {failure}", code="upstream_error")
            if relay is not None:
                relay.close()
                relay = None
            retried, upstream = True, other

        answer = relay.answer
        resp.status = answer.status
        for name, value in answer.getheaders():
            if name.lower() not in _RESPONSE_DROP:
                resp.append_header(name, value)
        resp.set_header("X-Shimmy-Upstream", upstream.url)
        client_gone = req.env.get("waitress.client_disconnected") or (lambda: False)
        resp.stream = relay.stream(client_gone)

    def _body(self, req: falcon.Request) -> bytes:
        length = req.content_length
        if length is not None and length > self.max_body:
            raise HTTPRefusal(413, f"The request body is larger than {self.max_body} bytes.", code="request_too_large")
        raw = req.bounded_stream.read(self.max_body + 1)
        if len(raw) > self.max_body:
            raise HTTPRefusal(413, f"The request body is larger than {self.max_body} bytes.", code="request_too_large")
        return raw

    def _acquire(self, model: str | None, key: str | None, exclude: tuple, prefer: Upstream | None) -> Upstream:
        try:
            return self.balancer.acquire(model, key, exclude, prefer)
        except NoUpstream as exc:
            if exc.full:
                raise HTTPRefusal(503, "Every upstream that serves this model is busy. Retry shortly.",
                                  code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_FULL_S)}) from None
            if model is not None and any(u.state == UP for u in self.pool.upstreams):
                raise ModelNotFound(model) from None
            raise HTTPRefusal(503, "No upstream is up. Retry shortly.", code="no_upstream",
                              headers={"Retry-After": str(RETRY_AFTER_FULL_S)}) from None

    def _try(self, upstream: Upstream, req: falcon.Request, target: str, raw: bytes):
        """Send the request to ``upstream`` and wait for the answer's headers and first body bytes:
        ``(None, relay)``, or ``(reason, None)`` after a failure (the upstream released)."""
        started = time.perf_counter()
        conn = upstream.connect(self.connect_timeout)
        try:
            conn.request(req.method, upstream.prefix + target, body=raw or None,
                         headers=forwarded_headers(req.headers, upstream, bool(self.api_keys)))
            conn.sock.settimeout(self.read_timeout)
            answer = conn.getresponse()
            relay = Relay(self, upstream, conn, answer, req.path)
            relay.first = relay.next_chunk() if req.method != "HEAD" else b""
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self.balancer.release(upstream)
            self.pool.failed(upstream, repr(exc))
            return repr(exc), None
        self.pool.answered(upstream, time.perf_counter() - started, answer.status)
        return None, relay

    def broken_stream_tail(self, path: str, upstream: Upstream, exc: BaseException,
                           response_id: str | None, sequence: int | None) -> bytes:
        """The last bytes of a stream whose upstream broke off: an error event in the framing of the
        dialect that owns ``path``, its body from that dialect's ``error_response``."""
        refusal = HTTPRefusal(502, f"The upstream {upstream.url} broke off the answer ({type(exc).__name__}); "
                                   "it is not replayed.", code="upstream_error")
        dialect = self.routes.dialect_for(path)
        name = getattr(dialect, "name", None)
        body = dialect.error_response(refusal)[2] if dialect is not None else {"error": {"message": refusal.message}}
        if name == "ollama_api":
            return json.dumps(body).encode() + b"\n"
        if name == "anthropic":
            return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"
        if name == "openai_responses":
            error = body.get("error") or {}
            seq = (sequence or 0) + 1
            event = {"type": "error", "sequence_number": seq, "code": error.get("code"),
                     "message": error.get("message"), "param": error.get("param")}
            failed = {"type": "response.failed", "sequence_number": seq + 1,
                      "response": {"id": response_id, "object": "response", "status": "failed",
                                   "error": {"code": "server_error", "message": error.get("message")}}}
            return (b"event: error\ndata: " + json.dumps(event).encode()
                    + b"\n\nevent: response.failed\ndata: " + json.dumps(failed).encode() + b"\n\n")
        return b"data: " + json.dumps(body).encode() + b"\n\ndata: [DONE]\n\n"


# ------------------------------------------------------------------ the front's own routes
class ModelsResource:
    """``/v1/models`` and ``/v1/models/{id}``: the union of the upstreams' lists."""

    def __init__(self, pool: Pool):
        self.pool = pool

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"object": "list", "data": self.pool.models()}

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        record = next((m for m in self.pool.models() if m["id"] == model_id), None)
        if record is None:
            raise ModelNotFound(model_id)
        resp.media = record


class TagsResource:
    """Ollama's ``/api/tags``: the same union in Ollama's shape."""

    def __init__(self, pool: Pool):
        self.pool = pool

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        models = []
        for record in self.pool.models():
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.get("created") or 0))
            models.append({"name": record["id"], "model": record["id"], "modified_at": stamp, "size": 0,
                           "digest": "", "details": {"format": "", "family": "", "parameter_size": "",
                                                     "quantization_level": ""}})
        resp.media = {"models": models}


class HealthResource:
    def __init__(self, front: Front):
        self.front = front

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        front = self.front
        with front.pool.lock:
            upstreams = [u.describe() for u in front.pool.upstreams]
        up = sum(u["state"] == UP for u in upstreams)
        status = "shutting_down" if front.lifecycle.draining else "ok" if up == len(upstreams) else \
            "degraded" if up else "no_upstream"
        if status in ("shutting_down", "no_upstream"):
            resp.status = falcon.HTTP_503
            resp.set_header("Retry-After", str(RETRY_AFTER_SHUTDOWN_S))
        resp.media = {"status": status, "version": __version__, "role": "route", "policy": front.balancer.policy,
                      "in_flight": front.lifecycle.active, "upstreams": upstreams}


class MetricsResource:
    """``/metrics`` per upstream: in flight, requests, errors, ejections, whether it is up, and the
    time to its answer's first byte.  prometheus_client is imported on the first scrape."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self._registry = None

    def _collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        label = ["upstream"]
        in_flight = GaugeMetricFamily("shimmy_route_in_flight", "Requests this front has on the upstream now.",
                                      labels=label)
        up = GaugeMetricFamily("shimmy_route_upstream_up", "1 when the upstream takes requests.", labels=label)
        requests = CounterMetricFamily("shimmy_route_requests", "Requests sent to the upstream.", labels=label)
        errors = CounterMetricFamily("shimmy_route_errors", "Connection errors, 5xx and broken answers.", labels=label)
        ejections = CounterMetricFamily("shimmy_route_ejections", "Times the upstream was ejected.", labels=label)
        latency = HistogramMetricFamily("shimmy_route_upstream_latency_seconds",
                                        "Time from sending a request to the answer's first body bytes.", labels=label)
        with self.pool.lock:
            for u in self.pool.upstreams:
                in_flight.add_metric([u.url], u.outstanding)
                up.add_metric([u.url], 1.0 if u.state == UP else 0.0)
                requests.add_metric([u.url], u.requests)
                errors.add_metric([u.url], u.errors)
                ejections.add_metric([u.url], u.ejections)
                total, buckets = 0, []
                for edge, count in zip([*map(str, LATENCY_BUCKETS), "+Inf"], u.latency_counts):
                    total += count
                    buckets.append((edge, total))
                latency.add_metric([u.url], buckets, u.latency_sum)
        return [in_flight, up, requests, errors, ejections, latency]

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        if self._registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(type("RouteCollector", (), {"collect": lambda _self: self._collect()})())
            self._registry = registry
        resp.data, resp.content_type = generate_latest(self._registry), CONTENT_TYPE_LATEST


def create_front_app(front: Front) -> falcon.App:
    routes = front.routes
    app = falcon.App(middleware=[HostCheck(front.host, front.allowed_hosts), Draining(front.lifecycle, routes),
                                 Auth(front.api_keys, routes)],
                     cors_enable=False)
    app.req_options.strip_url_path_trailing_slash = True
    app.resp_options.secure_cookies_by_default = False
    routes.bind(app)
    routes.add("/health", HealthResource(front), open=True)
    routes.add("/metrics", MetricsResource(front.pool))
    models = ModelsResource(front.pool)
    routes.add("/v1/models", models)
    routes.add("/v1/models/{model_id:path}", models, suffix="one")
    routes.add("/api/tags", TagsResource(front.pool))
    app.add_sink(front.forward, prefix="/")
    install_error_handler(app, routes)
    return app
