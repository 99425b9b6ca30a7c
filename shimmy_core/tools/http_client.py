"""An HTTP client for tools that must not become a way into the user's network (SSRF).

- Only ``http`` and ``https`` URLs, without credentials, control characters or backslashes.
- The host is resolved **once**; every address it resolves to is checked, and the connection goes
  to the checked address (the TLS certificate is still verified against the host name).  A DNS
  answer that changes between the check and the connection (DNS rebinding) has nothing to change.
- Refused addresses: loopback, private (RFC 1918, unique-local), link-local (with the cloud
  metadata service at 169.254.169.254), CGNAT (100.64.0.0/10, Alibaba's metadata at
  100.100.100.200), multicast, unspecified, reserved, documentation and benchmarking ranges,
  Azure's wire server (168.63.129.16), and the same addresses in disguise: IPv4-mapped
  (``::ffff:127.0.0.1``), IPv4-compatible (``::127.0.0.1``), NAT64 (``64:ff9b::/96``, and
  ``64:ff9b:1::/48`` outright), 6to4 (``2002::/16``), Teredo (``2001::/32``, outright), and the
  number forms ``2130706433``, ``0x7f000001``, ``0177.0.0.1`` or ``127.1`` (which resolve to
  127.0.0.1 like the dotted form).  ``ipaddress``'s own flags miss several of these (its
  ``is_private`` says nothing about CGNAT, and before Python 3.13 nothing about mapped addresses),
  so the embedded IPv4 address is taken out and checked, and ``is_global`` is required last.
- An allow-list admits hosts that would be refused: an entry is a host name as written in the URL
  (``intranet.local``, ``*.corp.example``, ``127.0.0.1``) or a network (``10.1.0.0/16``) that the
  resolved address must lie in.
- One deadline for the whole request (connect, headers, body, redirects): a watchdog shuts the
  socket when it passes, so a server that drips one byte a second cannot hold the request past it
  (a read timeout alone never fires on such a server).
- The body is capped in decoded bytes: gzip and deflate are decoded here, incrementally, and
  reading stops at the cap (a gzip bomb inflates no further than the cap).
- Redirects are followed only up to a limit and each target is checked again, like the first URL.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Callable

USER_AGENT = "shimmy-http-tool"
_REDIRECTS = (301, 302, 303, 307, 308)

_BLOCKED_V4 = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
    "168.63.129.16/32",
)]
_BLOCKED_V6 = [ipaddress.ip_network(n) for n in (
    "::/128", "::1/128", "100::/64", "2001:db8::/32", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    "64:ff9b:1::/48",
)]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_TEREDO = ipaddress.ip_network("2001::/32")
_COMPATIBLE = ipaddress.ip_network("::/96")


class RequestRefused(ValueError):
    """The request was not made (or not finished); the message says why."""


def address_refusal(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why connecting to ``address`` is refused, or ``None`` when it is a public address."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return f"{ip} has a zone index"
        embedded = None
        if ip.ipv4_mapped is not None:
            embedded, how = ip.ipv4_mapped, "IPv4-mapped"
        elif ip in _NAT64:
            embedded, how = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
        elif ip.sixtofour is not None:
            embedded, how = ip.sixtofour, "6to4"
        elif ip in _TEREDO:
            return f"{ip} is a Teredo address"
        elif ip in _COMPATIBLE and int(ip) > 1:
            embedded, how = ipaddress.IPv4Address(int(ip)), "IPv4-compatible"
        if embedded is not None:
            reason = address_refusal(embedded)
            return f"{ip} is {embedded} in disguise ({how}): {reason}" if reason else None
        for net in _BLOCKED_V6:
            if ip in net:
                return f"{ip} is a {_kind(ip)} address"
    else:
        for net in _BLOCKED_V4:
            if ip in net:
                return f"{ip} is a {_kind(ip)} address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None


def _kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if ip.is_loopback:
        return "loopback"
    if str(ip) in ("169.254.169.254", "100.100.100.200", "168.63.129.16"):
        return "cloud metadata"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.ip_network("100.64.0.0/10"):
        return "carrier-grade NAT (CGNAT)"
    if ip.is_private:
        return "private"
    return "reserved"


@dataclass(frozen=True)
class HttpPolicy:
    allow: tuple[str, ...] = ()          # host names, *.suffixes, or networks (with a /)
    allow_post: bool = False
    timeout: float = 15.0                # the whole request, redirects included
    max_bytes: int = 1024 * 1024         # decoded body
    max_redirects: int = 3
    resolver: Callable[[str, int], list[str]] | None = field(default=None, compare=False)

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for entry in self.allow:
            entry = entry.lower().rstrip(".")
            if "/" in entry:
                continue
            if entry == host or (entry.startswith("*.") and host.endswith(entry[1:])):
                return True
        return False

    def address_allowed(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        for entry in self.allow:
            if "/" in entry:
                try:
                    if ip in ipaddress.ip_network(entry, strict=False):
                        return True
                except ValueError:
                    continue
        return False


@dataclass
class HttpResponse:
    url: str
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    truncated: bool

    def text(self) -> str:
        charset = "utf-8"
        for part in self.headers.get("content-type", "").split(";")[1:]:
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset" and value:
                charset = value.strip('"')
        try:
            return self.body.decode(charset, errors="replace")
        except LookupError:
            return self.body.decode("utf-8", errors="replace")


def _split(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, path?query)`` of a URL the client may fetch, or RequestRefused."""
    if not isinstance(url, str) or not url:
        raise RequestRefused("no URL")
    if any(ord(c) < 0x21 or c in "\\\x7f" for c in url):
        raise RequestRefused("the URL contains spaces, control characters or backslashes")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise RequestRefused(f"only http and https URLs are allowed, not {scheme or 'a relative URL'!r}")
    if "@" in parts.netloc:
        raise RequestRefused("URLs with credentials (user@host) are not allowed")
    host = parts.hostname
    if not host:
        raise RequestRefused("the URL has no host")
    if "%" in host:
        raise RequestRefused("IPv6 zone indexes are not allowed")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise RequestRefused("the URL has an invalid port") from None
    try:
        host.encode("idna")
    except UnicodeError:
        raise RequestRefused("the host name is invalid") from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return scheme, host, port, target


def _resolve(host: str, port: int, policy: HttpPolicy) -> list[str]:
    if policy.resolver is not None:
        return policy.resolver(host, port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise RequestRefused(f"cannot resolve {host!r}: {exc}") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def checked_address(host: str, port: int, policy: HttpPolicy) -> str:
    """Resolve ``host`` once and return the address to connect to, after checking every address
    it resolves to (all of them must pass, unless the host or the network is allow-listed)."""
    allowed_host = policy.host_allowed(host)
    addresses = _resolve(host, port, policy)
    if not addresses:
        raise RequestRefused(f"{host!r} resolves to no address")
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if allowed_host or policy.address_allowed(ip):
            continue
        reason = address_refusal(ip)
        if reason:
            shown = host if host == address else f"{host} ({address})"
            raise RequestRefused(f"refused to connect to {shown}: {reason}; allow-list the host to reach it")
    return addresses[0]


class _Watchdog:
    """Shuts the socket down when the deadline passes, whatever it is waiting for."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.fired = False
        self._sock: socket.socket | None = None
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        self._sock = sock
        if self.fired:
            self._fire()

    def _fire(self) -> None:
        self.fired = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0 or self.fired:
            raise RequestRefused("the request ran past its deadline")
        return left

    def expired(self) -> bool:
        """Whether the deadline has passed (a socket timeout set to the time left ends just before
        the watchdog fires)."""
        return self.fired or time.monotonic() >= self.deadline - 0.1

    def cancel(self) -> None:
        self._timer.cancel()


def _decoder(encoding: str):
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj(zlib.MAX_WBITS | 32)
    raise RequestRefused(f"unsupported Content-Encoding {encoding!r}")


def _read_body(resp: http.client.HTTPResponse, watchdog: _Watchdog, sock: socket.socket, cap: int) -> tuple[bytes, bool]:
    decoder = _decoder(resp.getheader("content-encoding", ""))
    out = bytearray()
    raw_cap = cap * 4 + 65536 if decoder is None else cap + 65536
    raw_total = 0
    while True:
        sock.settimeout(min(watchdog.left(), 5.0))
        try:
            data = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
        except (OSError, http.client.HTTPException) as exc:
            if watchdog.expired():
                raise RequestRefused("the request ran past its deadline") from None
            raise RequestRefused(f"reading the response failed: {type(exc).__name__}") from None
        if watchdog.fired:
            raise RequestRefused("the request ran past its deadline")
        if not data:
            break
        raw_total += len(data)
        if decoder is None:
            out += data
        else:
            try:
                chunk = decoder.decompress(data, cap + 1 - len(out))
                out += chunk
                while decoder.unconsumed_tail and len(out) <= cap:
                    out += decoder.decompress(decoder.unconsumed_tail, cap + 1 - len(out))
            except zlib.error:
                raise RequestRefused("the response's compressed body is corrupt") from None
        if len(out) > cap:
            return bytes(out[:cap]), True
        if decoder is None and raw_total > raw_cap:
            return bytes(out[:cap]), True
    return bytes(out), False


def fetch(url: str, policy: HttpPolicy, method: str = "GET", body: bytes | None = None,
          headers: dict[str, str] | None = None) -> HttpResponse:
    """Make one request under ``policy`` (following checked redirects); RequestRefused on any refusal."""
    method = method.upper()
    if method not in ("GET", "POST"):
        raise RequestRefused(f"method {method} is not allowed")
    if method == "POST" and not policy.allow_post:
        raise RequestRefused("POST requests are off (start Shimmy with --http-allow-post to allow them)")
    watchdog = _Watchdog(time.monotonic() + policy.timeout)
    try:
        for _ in range(policy.max_redirects + 1):
            response = _one(url, policy, method, body, headers or {}, watchdog)
            if response.status not in _REDIRECTS:
                return response
            location = response.headers.get("location")
            if not location:
                return response
            url = urllib.parse.urljoin(url, location)
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, body = "GET", None
        raise RequestRefused(f"more than {policy.max_redirects} redirects")
    finally:
        watchdog.cancel()


def _one(url: str, policy: HttpPolicy, method: str, body: bytes | None, headers: dict[str, str],
         watchdog: _Watchdog) -> HttpResponse:
    scheme, host, port, target = _split(url)
    address = checked_address(host, port, policy)
    try:
        sock = socket.create_connection((address, port), timeout=min(watchdog.left(), 10.0))
    except OSError as exc:
        raise RequestRefused(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    watchdog.watch(sock)
    try:
        if scheme == "https":
            context = ssl.create_default_context()
            sock.settimeout(min(watchdog.left(), 10.0))
            try:
                sock = context.wrap_socket(sock, server_hostname=host)
            except (ssl.SSLError, OSError) as exc:
                raise RequestRefused(f"TLS with {host} failed: {exc}") from None
            watchdog.watch(sock)
        conn_class = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = conn_class(host, port, timeout=watchdog.left())
        conn.sock = sock  # connected to the checked address: http.client never resolves the host
        sent = {"User-Agent": USER_AGENT, "Accept-Encoding": "gzip, deflate", **headers}
        sock.settimeout(min(watchdog.left(), 10.0))
        try:
            conn.request(method, target, body=body, headers=sent)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            if watchdog.expired():
                raise RequestRefused("the request ran past its deadline") from None
            raise RequestRefused(f"the request to {host} failed: {type(exc).__name__}") from None
        response_headers = {k.lower(): v for k, v in resp.getheaders()}
        if resp.status in _REDIRECTS:
            data, truncated = b"", False
        else:
            data, truncated = _read_body(resp, watchdog, sock, policy.max_bytes)
        return HttpResponse(url, resp.status, resp.reason, response_headers, data, truncated)
    finally:
        try:
            sock.close()
        except OSError:
            pass
