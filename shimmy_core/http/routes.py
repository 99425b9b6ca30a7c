"""The server's routes: who added each one, which run generations and which need no key.

The core adds ``/health`` and ``/metrics``; every other route comes from an API dialect
(``shimmy_register_dialects``).  The middleware asks this table for a path's route: its metrics label,
whether it is a generation route (it gets the ``X-Shimmy-Cache`` header) and whether it is
open (never behind ``--api-key``); the error handler asks which dialect answers a path's errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import falcon

OTHER = "other"     # the metrics label of a path no route serves
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}")


class RouteConflict(ValueError):
    """Two dialects (or a dialect and the core) added the same path."""


@dataclass(frozen=True)
class Route:
    template: str          # as Falcon takes it: /v1/models/{model_id:path}
    label: str             # as metrics show it: /v1/models/{model_id}
    owner: str             # "core" or the dialect's name
    generation: bool
    open: bool
    pattern: re.Pattern


class RouteTable:
    def __init__(self) -> None:
        self.app: falcon.App | None = None    # bound once the app exists (its middleware reads this table)
        self.routes: dict[str, Route] = {}
        self.dialects: dict[str, Any] = {}     # name -> dialect, for error_response

    def bind(self, app: falcon.App) -> None:
        self.app = app

    def add(self, path: str, resource: Any, *, suffix: str | None = None, owner: str = "core",
            generation: bool = False, open: bool = False) -> None:
        """Serve ``path`` with ``resource`` (Falcon's ``add_route``).  ``generation``: the route
        runs a model (it gets the ``X-Shimmy-Cache`` header); ``open``: no API key needed."""
        label = _FIELD.sub(lambda m: "{" + m.group(1) + "}", path)
        if path in self.routes:
            raise RouteConflict(f"the route {path} is added by both {self.routes[path].owner!r} and {owner!r}")
        pattern = re.compile("^" + _FIELD.sub(lambda m: ".+" if ":path" in m.group(0) else "[^/]+",
                                              re.escape(path).replace(r"\{", "{").replace(r"\}", "}")) + "$")
        self.routes[path] = Route(path, label, owner, generation, open, pattern)
        if suffix:
            self.app.add_route(path, resource, suffix=suffix)
        else:
            self.app.add_route(path, resource)

    def add_dialect(self, dialect: Any, server: Any) -> None:
        self.dialects[dialect.name] = dialect
        table = self

        class _Owned:
            """The table as one dialect sees it: its routes are marked as its own."""

            def add(self, path: str, resource: Any, **options: Any) -> None:
                table.add(path, resource, owner=dialect.name, **options)

        dialect.add_routes(_Owned(), server)

    def match(self, path: str) -> Route | None:
        path = path.rstrip("/") or "/"
        exact = self.routes.get(path)
        if exact is not None:
            return exact
        return next((r for r in self.routes.values() if "{" in r.template and r.pattern.match(path)), None)

    def label(self, path: str) -> str:
        """A bounded label for metrics: the route's template, or ``other``."""
        route = self.match(path)
        return route.label if route is not None else OTHER

    def is_open(self, path: str) -> bool:
        route = self.match(path)
        return route is not None and route.open

    def dialect_for(self, path: str) -> Any | None:
        """The dialect whose error envelope answers ``path``: the one owning its route, else the
        longest of the dialects' path prefixes that matches."""
        route = self.match(path)
        if route is not None and route.owner in self.dialects:
            return self.dialects[route.owner]
        best, length = None, -1
        for dialect in self.dialects.values():
            for prefix in getattr(dialect, "prefixes", ()):
                if path.startswith(prefix) and len(prefix) > length:
                    best, length = dialect, len(prefix)
        return best
