"""Shimmy's own default answers to decision hooks, each marked ``trylast`` so
that any plugin can override it."""

from __future__ import annotations

from shimmy_core.contract.hookspecs import hookimpl


@hookimpl(trylast=True)
def shimmy_backend_for_model(model, backends):
    for name, backend in backends.items():
        if model.format in getattr(backend, "formats", ()):
            return name
    return None
