"""Anthropic's error envelope, ``{"type": "error", "error": {"type": ..., "message": ...}}``, and
the mapping from the core's neutral errors to it, with Anthropic's status codes (a full queue is
529 ``overloaded_error`` with ``retry-after``)."""

from __future__ import annotations

import math

from shimmy_core.plugin_api import BackendUnavailable, ContextLengthExceeded, HTTPRefusal, InvalidRequest
from shimmy_core.plugin_api import ModelLoadError, ModelNotFound, neutral_error, Overloaded

OVERLOADED = 529
_STATUS_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    OVERLOADED: "overloaded_error",
}


class AnthropicError(Exception):
    """An error with an HTTP status and an Anthropic error body."""

    def __init__(self, status: int, message: str, type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _STATUS_TYPE.get(status, "invalid_request_error" if status < 500 else "api_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"type": "error", "error": {"type": self.type, "message": self.message}}


def invalid(message: str) -> AnthropicError:
    return AnthropicError(400, message)


def _context_message(exc: ContextLengthExceeded) -> str:
    """Claude Code reads these two sentences (as Anthropic writes them) to shorten its request."""
    if exc.prompt_tokens is None or exc.context_length is None:
        return f"prompt is too long: {exc}"
    if exc.requested is None:
        return f"prompt is too long: {exc.prompt_tokens} tokens > {exc.context_length} maximum"
    return (f"input length and `max_tokens` exceed context limit: {exc.prompt_tokens} + {exc.requested} > "
            f"{exc.context_length}, decrease input length or `max_tokens` and try again")


def from_exception(exc: BaseException) -> AnthropicError:
    """Any exception as an :class:`AnthropicError`; unknown ones are internal errors (logged)."""
    if isinstance(exc, AnthropicError):
        return exc
    exc = neutral_error(exc)
    if isinstance(exc, ContextLengthExceeded):
        return invalid(_context_message(exc))
    if isinstance(exc, InvalidRequest):
        return invalid(str(exc))
    if isinstance(exc, ModelNotFound):
        return AnthropicError(404, f"model: {exc.model} (no model by this name is served here; GET /v1/models lists "
                                   "them, and the server's --model-alias maps other names to them)")
    if isinstance(exc, Overloaded):
        return AnthropicError(OVERLOADED, str(exc), headers={"retry-after": str(max(1, math.ceil(exc.retry_after)))})
    if isinstance(exc, BackendUnavailable):
        return AnthropicError(503, str(exc), type="api_error")
    if isinstance(exc, ModelLoadError):
        return AnthropicError(500, str(exc))
    if isinstance(exc, HTTPRefusal):
        message = exc.message
        if exc.code == "invalid_api_key" and "didn't provide" in message:
            message = "You didn't provide an API key. Send it as 'x-api-key: KEY' (or 'Authorization: Bearer KEY')."
        return AnthropicError(exc.status, message, headers=exc.headers)
    return AnthropicError(500, str(exc))


def error_response(exc: BaseException) -> tuple[int, dict[str, str], dict]:
    """``(status, headers, body)`` of any exception in Anthropic's envelope."""
    err = from_exception(exc)
    return err.status, err.headers, err.body()
