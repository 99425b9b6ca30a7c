"""The page and its static files.  Only the files found under ``static/`` when the server starts
are served, by their exact relative path: a requested name is looked up, never joined to a folder,
so ``..``, encoded or not, finds nothing (404).  Every answer carries a strict Content-Security-
Policy: the page runs only its own scripts and styles and talks only to this server."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import falcon

from shimmy_core.plugin_api import HTTPRefusal

STATIC = Path(__file__).resolve().parent / "static"
PAGE = "index.html"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer"}
# The types served; a file of any other kind under static/ (a licence, VERSIONS.md) is not served.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


@dataclass(frozen=True)
class StaticFiles:
    """The servable files: relative POSIX path -> file."""

    files: dict[str, Path]

    @classmethod
    def scan(cls, root: Path) -> "StaticFiles":
        found = {}
        for folder, _, names in os.walk(root):
            for name in names:
                path = Path(folder) / name
                if path.suffix in CONTENT_TYPES and not path.is_symlink():
                    found[path.relative_to(root).as_posix()] = path
        return cls(found)

    @classmethod
    def default(cls) -> "StaticFiles":
        return cls.scan(STATIC)

    def send(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        path = self.files.get(name)
        if path is None:
            raise HTTPRefusal(404, f"The chat page has no file {name!r}.", code="not_found")
        data = path.read_bytes()
        resp.content_type = CONTENT_TYPES[path.suffix]
        for header, value in SECURITY_HEADERS.items():
            resp.set_header(header, value)
        resp.cache_control = ["no-cache"]  # revalidated by ETag: an upgraded page is never stale
        etag = hashlib.sha256(data).hexdigest()[:32]
        resp.etag = etag
        if req.if_none_match and any(tag in (etag, "*") for tag in req.if_none_match):
            resp.status = falcon.HTTP_304
            return
        resp.data = data


class PageResource:
    """``GET /``: the chat page."""

    def __init__(self, files: StaticFiles):
        self.files = files

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.files.send(req, resp, PAGE)


class StaticResource:
    """``GET /ui/NAME``: the page's scripts, styles and the vendored libraries."""

    def __init__(self, files: StaticFiles):
        self.files = files

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        self.files.send(req, resp, name)
