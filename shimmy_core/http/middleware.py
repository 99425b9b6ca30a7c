"""Falcon middleware: everything that concerns every request, kept out of the
resources.  In order:

1. :class:`RequestLog` - request id, the count of requests in flight (for a
   graceful shutdown), metrics and one log line per request, written when the
   answer is complete (for a stream, when its last byte is out).
2. :class:`HeaderLimit` - request headers over ``max_header_bytes``: 431.
3. :class:`HostCheck` - a ``Host`` that is not this machine's: 403 (DNS rebinding).
4. :class:`CORS` - browser origins: localhost ones and ``--cors-origin``; others 403.
5. :class:`Draining` - while the server shuts down: 503 with ``Retry-After``.
6. :class:`Auth` - ``--api-key``: a Bearer key or an ``X-Api-Key`` header, compared in constant time; 401.

Every refusal is a neutral :class:`HTTPRefusal`, which leaves in the envelope of the dialect that
owns the path (see :mod:`shimmy_core.http.errors`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import time
import uuid
from typing import TYPE_CHECKING, Callable, Iterable
from urllib.parse import urlsplit

import falcon

from shimmy_core.contract.dialect import HTTPRefusal
from shimmy_core.http.routes import OTHER, RouteTable
from shimmy_core.lifecycle import Lifecycle, ShuttingDown
from shimmy_core import streams

if TYPE_CHECKING:  # pragma: no cover
    from shimmy_core.metrics import Metrics
    from shimmy_core.contract.settings import Settings

access_log = logging.getLogger("shimmy.access")

CORE_ROUTES = ("/health", "/metrics")           # still answered while the server drains
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TOKEN_LIST = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")
EXPOSED_HEADERS = "X-Request-Id, X-Shimmy-Cache, Retry-After"
# Request headers a preflight may always name (API clients' own: keys and API versions); any other
# well-formed list a browser asks for is echoed as well.
ALLOWED_HEADERS = "Authorization, Content-Type, X-Api-Key, Anthropic-Version, Anthropic-Beta"


def build_middleware(settings: "Settings", lifecycle: Lifecycle, metrics: "Metrics", routes: RouteTable) -> list:
    return [
        RequestLog(lifecycle, metrics, settings.log_prompts, routes),
        HeaderLimit(settings.max_header_bytes),
        HostCheck(settings.host, settings.allowed_hosts),
        CORS(settings.cors_origins),
        Draining(lifecycle, routes),
        Auth(settings.api_key, routes),
    ]


# ------------------------------------------------------------------ 1. request log, metrics, lifecycle
class _WatchedStream:
    """A streamed body that calls ``done`` once, when it ends or is closed (client gone)."""

    def __init__(self, inner: Iterable[bytes], done: Callable[[], None]):
        self._inner = inner
        self._it = iter(inner)
        self._done = done
        self._finished = False

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._it)
        except BaseException:
            self._finish()
            raise

    def close(self) -> None:
        try:
            streams.close(self._inner)
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._done()


class RequestLog:
    def __init__(self, lifecycle: Lifecycle, metrics: "Metrics", log_prompts: bool, routes: RouteTable):
        self.routes = routes
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.log_prompts = log_prompts

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()
        given = req.get_header("X-Request-Id")
        req.context.request_id = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex
        self.lifecycle.started()

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        if not hasattr(req.context, "started"):  # pragma: no cover - process_request always runs first
            return
        resp.set_header("X-Request-Id", req.context.request_id)
        matched = self.routes.match(req.path)
        route = matched.label if matched is not None else OTHER
        if matched is not None and matched.generation:
            resp.set_header("X-Shimmy-Cache", getattr(req.context, "cache", "miss"))
        status = resp.status_code if hasattr(resp, "status_code") else int(str(resp.status).split()[0])
        if resp.stream is not None:
            resp.stream = _WatchedStream(resp.stream, lambda: self._finish(req, route, status))
        else:
            self._finish(req, route, status)

    def _finish(self, req: falcon.Request, route: str, status: int) -> None:
        try:
            ctx = req.context
            elapsed = time.perf_counter() - ctx.started
            model = getattr(ctx, "model", None)
            usage = getattr(ctx, "usage", None)
            cache = getattr(ctx, "cache", None)
            self.metrics.record(route, req.method, status, elapsed, model, usage, cache, getattr(ctx, "ttft", None))
            parts = [req.method, req.path, str(status)]
            if model:
                parts.append(f"model={model}")
            if usage:
                parts.append(f"tokens={usage[0]}+{usage[1]}")
            if cache:
                parts.append(f"cache={cache}")
            parts += [f"{elapsed * 1000:.0f}ms", f"id={ctx.request_id}"]
            prompt = getattr(ctx, "prompt", None)
            if self.log_prompts and prompt is not None:
                parts.append("prompt=" + json.dumps(prompt, ensure_ascii=False))
            access_log.info(" ".join(parts))
        finally:
            self.lifecycle.finished()


# ------------------------------------------------------------------ 2. header size
class HeaderLimit:
    """waitress's own limit is higher and answers in plain text: this one answers in JSON."""

    def __init__(self, limit: int):
        self.limit = limit

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        size = sum(len(k) - 5 + len(v) + 4 for k, v in req.env.items() if k.startswith("HTTP_") and isinstance(v, str))
        size += sum(len(req.env.get(k) or "") for k in ("CONTENT_TYPE", "CONTENT_LENGTH"))
        size += len(req.env.get("PATH_INFO") or "") + len(req.env.get("QUERY_STRING") or "")
        if size > self.limit:
            raise HTTPRefusal(431, f"The request headers are larger than {self.limit} bytes.", code="headers_too_large")


# ------------------------------------------------------------------ 3. DNS rebinding
def _host_name(header: str) -> str:
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return header.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class HostCheck:
    """Answer only requests addressed to this machine.  A web page can make a browser send
    requests to 127.0.0.1 under the page's own host name (DNS rebinding, the attack behind
    Ollama's CVE-2024-28224): the ``Host`` header then names the attacker's domain.

    Admitted: no Host, IP addresses, ``localhost`` and ``*.localhost``, names without a dot (no
    public domain has none: ``shimmy`` in a compose network), this machine's host name, the
    bound address, and ``--allowed-host`` names (``.example.com`` admits its subdomains; ``*``
    turns the check off)."""

    def __init__(self, bound_host: str, allowed: Iterable[str]):
        names = {_host_name(a) if a not in ("*",) and not a.startswith(".") else a.lower() for a in allowed}
        self.any = "*" in names
        self.suffixes = tuple(n for n in names if n.startswith("."))
        self.names = {n for n in names if not n.startswith(".")} | {_host_name(bound_host), "localhost"}
        try:
            self.names.add(socket.gethostname().lower())
        except OSError:  # pragma: no cover
            pass

    def allowed(self, header: str | None) -> bool:
        if self.any or not header:
            return True
        name = _host_name(header)
        return (
            name in self.names
            or "." not in name
            or name.endswith(".localhost")
            or _is_ip(name)
            or name.endswith(self.suffixes)
        )

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        header = req.env.get("HTTP_HOST")
        if not self.allowed(header):
            name = _host_name(header or "")
            raise HTTPRefusal(
                403,
                f"Requests for the host {name!r} are refused: this server answers requests addressed to "
                f"this machine (a web page may be trying a DNS rebinding attack). If {name!r} is yours, "
                f"start Shimmy with --allowed-host {name}.",
                code="host_not_allowed",
            )


# ------------------------------------------------------------------ 4. CORS
def _normal_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def _local_origin(origin: str) -> bool:
    try:
        parts = urlsplit(origin)
        host = (parts.hostname or "").rstrip(".")
        parts.port  # a malformed port raises
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CORS:
    """Web pages may call the API from their own origin (the chat page at ``/``, wherever the
    server is reached: the Host check has vetted that name), from localhost origins and from
    ``--cors-origin`` ones (``*``: any).  A request from any other origin is refused (403) instead of being run with
    its answer hidden by the browser.  Credentials (cookies) are never allowed, so ``*`` never
    comes with them; the API key travels in the Authorization header."""

    METHODS = "GET, POST, OPTIONS"
    MAX_AGE = "600"

    def __init__(self, origins: Iterable[str]):
        normal = {_normal_origin(o) for o in origins if o.strip()}
        self.any = "*" in normal
        self.origins = normal - {"*"}

    def allowed(self, origin: str, own: str | None = None) -> bool:
        """``own``: the origin the request was sent to (its scheme and Host header)."""
        normal = _normal_origin(origin)
        if normal == "null":
            return self.any
        return self.any or normal in self.origins or _local_origin(normal) or normal == own

    @staticmethod
    def own_origin(req: falcon.Request) -> str | None:
        host = req.get_header("Host")
        return _normal_origin(f"{req.scheme}://{host}") if host else None

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        origin = req.get_header("Origin")
        if origin is None:
            return
        if not self.allowed(origin, self.own_origin(req)):
            raise HTTPRefusal(
                403,
                f"Requests from the web origin {origin!r} are refused. Start Shimmy with --cors-origin {origin} "
                "to let pages from it call the API.",
                code="origin_not_allowed",
            )
        if req.method == "OPTIONS" and req.get_header("Access-Control-Request-Method"):
            requested = req.get_header("Access-Control-Request-Headers")
            resp.status = falcon.HTTP_204
            resp.set_header("Access-Control-Allow-Methods", self.METHODS)
            if requested and _TOKEN_LIST.match(requested.strip()):
                resp.set_header("Access-Control-Allow-Headers", requested.strip())
            else:
                resp.set_header("Access-Control-Allow-Headers", ALLOWED_HEADERS)
            if (req.get_header("Access-Control-Request-Private-Network") or "").lower() == "true":
                resp.set_header("Access-Control-Allow-Private-Network", "true")
            resp.set_header("Access-Control-Max-Age", self.MAX_AGE)
            resp.complete = True

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        origin = req.get_header("Origin")
        resp.append_header("Vary", "Origin")
        if origin is None or not self.allowed(origin, self.own_origin(req)):
            return
        resp.set_header("Access-Control-Allow-Origin", "*" if self.any else origin)
        resp.set_header("Access-Control-Expose-Headers", EXPOSED_HEADERS)


# ------------------------------------------------------------------ 5. shutdown
class Draining:
    def __init__(self, lifecycle: Lifecycle, routes: RouteTable):
        self.lifecycle = lifecycle
        self.routes = routes

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self.lifecycle.draining and self.routes.label(req.path) not in CORE_ROUTES:
            raise ShuttingDown()


# ------------------------------------------------------------------ 6. API keys
def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class Auth:
    """``--api-key``: every route but ``/health`` (and CORS preflights, which browsers send
    without credentials) needs the key, as ``Authorization: Bearer KEY`` or as ``X-Api-Key: KEY``
    (the header Anthropic's clients send); with both, the Bearer key counts.  The key is compared
    with every configured key in constant time (digests of equal length, no early exit)."""

    def __init__(self, keys: Iterable[str], routes: RouteTable):
        self._digests = [_digest(k) for k in keys if k]
        self.routes = routes

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self._digests or self.routes.is_open(req.path) or req.method == "OPTIONS":
            return
        scheme, _, token = (req.get_header("Authorization") or "").strip().partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        token = token or (req.get_header("X-Api-Key") or "").strip()
        if not token:
            raise _unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.")
        given = _digest(token)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(given, digest)
        if not matched:
            raise _unauthorized("Incorrect API key provided.")


def _unauthorized(message: str) -> HTTPRefusal:
    return HTTPRefusal(401, message, code="invalid_api_key",
                       headers={"WWW-Authenticate": 'Bearer realm="shimmy"'})
