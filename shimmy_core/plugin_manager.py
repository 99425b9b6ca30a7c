"""Build Shimmy's plugin manager: built-ins and third-party plugins alike come
from the ``shimmy`` entry-point group, loaded one at a time so that a broken
plugin is reported instead of taking the server down."""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from typing import Iterable

import pluggy

from shimmy_core import defaults
from shimmy_core.contract import hookspecs

ENTRY_POINT_GROUP = hookspecs.PROJECT


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded, and why."""

    name: str
    error: str
    distribution: str | None = None


@dataclass
class PluginReport:
    """What happened while plugins were loaded (shown by ``shimmy plugins``)."""

    loaded: dict[str, str | None] = field(default_factory=dict)  # name -> distribution
    failed: list[PluginFailure] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)


class ShimmyPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers its load report."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.report = PluginReport()


def _unknown_hooks(plugin: object) -> list[str]:
    specs = {name for name in dir(hookspecs) if name.startswith("shimmy_")}
    marker = f"{hookspecs.PROJECT}_impl"
    return [
        name
        for name in dir(plugin)
        if hasattr(getattr(plugin, name, None), marker) and name not in specs
    ]


def _hint(name: str) -> str:
    specs = [n for n in dir(hookspecs) if n.startswith("shimmy_")]
    close = difflib.get_close_matches(name, specs, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def add_plugin(pm: ShimmyPluginManager, plugin: object, name: str, dist: str | None = None) -> bool:
    """Register one plugin object; record and return False if it is broken.

    A hook implementation whose name matches no hookspec (a typo such as
    ``shimmy_register_backend``) is an error for that plugin: it is reported
    loudly on stderr and in ``shimmy plugins``, and the plugin is not used.
    """
    unknown = _unknown_hooks(plugin)
    if unknown:
        error = "; ".join(f"unknown hook {u!r}{_hint(u)}" for u in unknown)
        print(f"shimmy: plugin {name!r} is broken: {error}", file=sys.stderr)
        pm.report.failed.append(PluginFailure(name, error, dist))
        return False
    try:
        pm.register(plugin, name=name)
    except Exception as exc:  # pluggy.PluginValidationError, ValueError (duplicate name)
        pm.report.failed.append(PluginFailure(name, f"{type(exc).__name__}: {exc}", dist))
        return False
    pm.report.loaded[name] = dist
    return True


def _split(value: str | None) -> set[str]:
    return {part.strip() for part in (value or "").split(",") if part.strip()}


def create_plugin_manager(
    disable: Iterable[str] = (),
    *,
    load_entry_points: bool = True,
    extra_plugins: Iterable[tuple[str, object]] = (),
) -> ShimmyPluginManager:
    """Create a plugin manager with Shimmy's hookspecs and its plugins.

    ``disable`` names plugins (built-in or not) to skip; ``SHIMMY_DISABLE_PLUGINS``
    adds more (comma-separated).  ``SHIMMY_LOAD_PLUGINS``, when set, loads only
    the entry points it names.  ``extra_plugins`` registers ``(name, object)``
    pairs directly (used by tests and embedding applications).
    ``SHIMMY_TRACE_HOOKS=1`` prints every hook call to stderr.
    """
    pm = ShimmyPluginManager()
    pm.add_hookspecs(hookspecs)
    pm.register(defaults, name="shimmy.defaults")
    disabled = set(disable) | _split(os.environ.get("SHIMMY_DISABLE_PLUGINS"))
    only = _split(os.environ.get("SHIMMY_LOAD_PLUGINS")) or None

    if load_entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            if ep.name in disabled or (only is not None and ep.name not in only):
                pm.report.disabled.append(ep.name)
                continue
            if pm.has_plugin(ep.name) or ep.name in pm.report.loaded:
                continue  # the same distribution seen twice on sys.path
            try:
                plugin = ep.load()
            except Exception as exc:
                pm.report.failed.append(PluginFailure(ep.name, f"{type(exc).__name__}: {exc}", dist))
                continue
            add_plugin(pm, plugin, ep.name, dist)
    for name, plugin in extra_plugins:
        if name in disabled:
            pm.report.disabled.append(name)
            continue
        add_plugin(pm, plugin, name)
    pm.check_pending()
    if os.environ.get("SHIMMY_TRACE_HOOKS"):
        pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
        pm.enable_tracing()
    return pm
