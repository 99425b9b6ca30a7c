"""API dialects: each wire format (OpenAI chat and completions, Responses, Anthropic Messages,
Ollama...) is a plugin that brings its routes and translates its requests to the neutral model of
:mod:`shimmy_core.contract.generation` and the neutral chunks back to its own bodies, stream
framing and error envelope.

A dialect is registered through ``shimmy_register_dialects(register)`` and has:

- ``name``: unique (``"openai"``);
- ``prefixes``: the URL path prefixes whose errors it answers in its envelope, also on paths
  nothing serves and for refusals made before routing (a key missing, a body too large); the
  longest prefix that matches a path wins (the OpenAI dialect claims ``"/"``);
- ``add_routes(routes, server)``: adds its resources with ``routes.add(path, resource, ...)``
  (see :class:`shimmy_core.http.routes.RouteTable`); ``server`` is a
  :class:`shimmy_core.http.dialect_kit.DialectServer`, the running server's parts (the
  completion service, the catalog, the response cache, settings...);
- ``error_response(exc) -> (status, headers, body)``: any exception as its error envelope (a
  JSON-compatible ``body``). The core's errors are neutral (:class:`HTTPRefusal` here and the
  errors of :mod:`shimmy_core.contract.generation`); anything else is an internal error, which
  ``plugin_api.neutral_error`` turns into a logged ``HTTPRefusal(500)``.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable


class HTTPRefusal(Exception):
    """A refusal at the HTTP level, before or around a dialect's own checks: no such route (404),
    a method it does not take (405), a body or headers too large (413, 431), a key missing (401), a
    host or origin refused (403), an internal error (500).  ``code`` is a short machine-readable
    reason; each dialect renders it in its own error envelope."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


@runtime_checkable
class Dialect(Protocol):
    name: str
    prefixes: Sequence[str]

    def add_routes(self, routes: Any, server: Any) -> None:
        """Add this dialect's resources to ``routes`` (a RouteTable); ``server`` is the DialectServer."""

    def error_response(self, exc: BaseException) -> tuple[int, dict[str, str], Any]:
        """``(status, headers, JSON body)`` for any exception, in this dialect's envelope."""
