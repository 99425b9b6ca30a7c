"""Ollama's error shape, ``{"error": "..."}``, and the mapping from the core's neutral errors to
Ollama's status codes (400 for a bad request, 404 for an unknown model, 503 when busy, 500 else)."""

from __future__ import annotations

import math

from shimmy_core.plugin_api import BackendUnavailable, HTTPRefusal, InvalidRequest, ModelLoadError, ModelNotFound
from shimmy_core.plugin_api import neutral_error, Overloaded


class OllamaError(Exception):
    """An error with an HTTP status, answered as ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> OllamaError:
    return OllamaError(400, message)


def not_found(model: str) -> OllamaError:
    return OllamaError(404, f"model {model!r} not found; Shimmy serves the models it finds on this machine "
                            "and does not download any (GET /api/tags lists them)")


def as_ollama(exc: BaseException) -> OllamaError:
    """Any exception as an :class:`OllamaError`; unknown ones are logged internal errors."""
    if isinstance(exc, OllamaError):
        return exc
    exc = neutral_error(exc)
    if isinstance(exc, ModelNotFound):
        return not_found(exc.model)
    if isinstance(exc, InvalidRequest):
        return bad_request(str(exc))
    if isinstance(exc, Overloaded):
        return OllamaError(503, str(exc), {"Retry-After": str(max(1, math.ceil(exc.retry_after)))})
    if isinstance(exc, BackendUnavailable):
        return OllamaError(503, str(exc))
    if isinstance(exc, ModelLoadError):
        return OllamaError(500, str(exc))
    if isinstance(exc, HTTPRefusal):
        return OllamaError(exc.status, exc.message, exc.headers)
    return OllamaError(500, str(exc))


def error_response(exc: BaseException) -> tuple[int, dict[str, str], dict]:
    err = as_ollama(exc)
    return err.status, err.headers, {"error": err.message}
