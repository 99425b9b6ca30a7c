"""The OpenAI error envelope and the mapping from the core's neutral errors to it."""

from __future__ import annotations

import math

from shimmy_core.plugin_api import (
    BackendUnavailable,
    HTTPRefusal,
    InsufficientMemory,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    neutral_error,
    Overloaded,
)

_STATUS_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    507: "server_error",
}


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _STATUS_TYPE.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model {model!r} does not exist. GET /v1/models lists the models this server has.",
        param="model",
        code="model_not_found",
    )


def from_exception(exc: BaseException) -> APIError:
    """Map any exception to an :class:`APIError`: the core's neutral errors keep their meaning
    in OpenAI's shape; anything unknown is an internal error (logged by ``neutral_error``)."""
    if isinstance(exc, APIError):
        return exc
    exc = neutral_error(exc)
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, ModelNotFound):
        return model_not_found(exc.model)
    if isinstance(exc, Overloaded):
        retry = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        code = getattr(exc, "code", None) or ("queue_timeout" if exc.timed_out else "server_overloaded")
        return APIError(503, str(exc), type="server_error", code=code, headers=retry)
    if isinstance(exc, BackendUnavailable):
        return APIError(503, str(exc), code="backend_unavailable")
    if isinstance(exc, InsufficientMemory):
        return APIError(507, str(exc), code="insufficient_memory")
    if isinstance(exc, ModelLoadError):
        return APIError(500, str(exc), code="model_load_failed")
    if isinstance(exc, HTTPRefusal):
        # OpenAI answers a wrong or missing key with type invalid_request_error, not authentication_error
        kind = "invalid_request_error" if exc.code == "invalid_api_key" else None
        return APIError(exc.status, exc.message, type=kind, code=exc.code, headers=exc.headers)
    return APIError(500, str(exc), code="internal_error")


def error_response(exc: BaseException) -> tuple[int, dict[str, str], dict]:
    """``(status, headers, body)`` of any exception in OpenAI's envelope."""
    err = from_exception(exc)
    return err.status, err.headers, err.body()
