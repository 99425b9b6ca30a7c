"""The chat page: ``GET /`` and its static files under ``/ui/``, registered as a dialect
(``shimmy_register_dialects``) so that it comes and goes like any plugin (``--disable-plugin webui``)
and answers its own paths' errors.  ``--no-webui`` (``SHIMMY_WEBUI=0``) leaves its routes out: ``/``
is then a 404, as any path nothing serves.

The page needs no key to load (its routes are open); the API calls it makes do.  Its errors keep
OpenAI's envelope, the one ``/`` answered in before the page existed.  See docs/webui.md."""

from __future__ import annotations

from shimmy_core.plugin_api import DialectServer, HTTPRefusal, hookimpl, neutral_error
from shimmy_plugins.webui.webui_resources import SECURITY_HEADERS, PageResource, StaticFiles, StaticResource


class WebUIDialect:
    name = "webui"
    prefixes = ("/ui/",)

    def add_routes(self, routes, server: DialectServer) -> None:
        if not server.settings.webui:
            return
        files = StaticFiles.default()
        routes.add("/", PageResource(files), open=True)
        routes.add("/ui/{name:path}", StaticResource(files), open=True)

    def error_response(self, exc: BaseException):
        """OpenAI's envelope (``/`` answered in it before), with the page's security headers."""
        exc = neutral_error(exc)
        status = exc.status if isinstance(exc, HTTPRefusal) else 500
        headers = {**(exc.headers if isinstance(exc, HTTPRefusal) else {}), **SECURITY_HEADERS}
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": str(exc), "type": kind, "param": None, "code": getattr(exc, "code", None)}}
        return status, headers, body


@hookimpl
def shimmy_register_dialects(register):
    register(WebUIDialect())
