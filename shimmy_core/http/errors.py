"""Every error leaves in the envelope of the dialect that owns the path, never as a traceback.

The core raises neutral errors (:class:`~shimmy_core.contract.dialect.HTTPRefusal` and those of
:mod:`shimmy_core.contract.generation`); :func:`neutral_error` turns Falcon's own errors into
refusals and any other exception into a logged internal error, so that a dialect maps a closed
set of types.
"""

from __future__ import annotations

import json
import logging
import traceback

import falcon

from shimmy_core.contract.dialect import HTTPRefusal
from shimmy_core.contract.generation import BackendError, InsufficientMemory, Overloaded
from shimmy_core.http.routes import RouteTable

log = logging.getLogger("shimmy")

_FALCON_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def neutral_error(exc: BaseException) -> BaseException:
    """``exc`` if it is neutral (a :class:`BackendError` or an :class:`HTTPRefusal`); Falcon's
    HTTP errors as refusals; anything else logged with its traceback and answered as a 500."""
    if isinstance(exc, (BackendError, HTTPRefusal)):
        return exc
    if isinstance(exc, falcon.HTTPError):
        status = int(str(exc.status).split()[0]) if not isinstance(exc.status, int) else exc.status
        message = exc.description or exc.title or str(exc.status)
        return HTTPRefusal(status, message, code=_FALCON_CODES.get(status), headers=dict(exc.headers or {}))
    log.error("internal error: %s", "".join(traceback.format_exception(exc)))
    return HTTPRefusal(500, "The server had an internal error while processing the request.", code="internal_error")


def plain_error(exc: BaseException) -> tuple[int, dict[str, str], dict]:
    """The envelope of paths no dialect claims (every dialect plugin disabled)."""
    exc = neutral_error(exc)
    status = (exc.status if isinstance(exc, HTTPRefusal) else 503 if isinstance(exc, Overloaded)
              else 507 if isinstance(exc, InsufficientMemory) else 500)
    headers = exc.headers if isinstance(exc, HTTPRefusal) else {}
    return status, headers, {"error": {"message": str(exc), "code": getattr(exc, "code", None)}}


def install_error_handler(app: falcon.App, routes: RouteTable) -> None:
    def handle(req: falcon.Request, resp: falcon.Response, exc: BaseException, params: dict) -> None:
        dialect = routes.dialect_for(req.path)
        try:
            status, headers, body = dialect.error_response(exc) if dialect is not None else plain_error(exc)
        except Exception as failure:  # a dialect's own bug must not become a traceback either
            status, headers, body = plain_error(failure)
        resp.status = status
        resp.content_type = falcon.MEDIA_JSON
        for name, value in headers.items():
            if name.lower() != "content-type":
                resp.set_header(name, value)
        resp.text = json.dumps(body)
        resp.stream = None

    app.add_error_handler(Exception, handle)
    app.add_error_handler(falcon.HTTPError, handle)
