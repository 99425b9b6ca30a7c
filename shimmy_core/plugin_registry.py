"""What the plugins registered: backends, model formats, discovery sources, caches, tools and API
dialects.

Each collection hook is called plugin by plugin with a ``register`` callback
that knows who is calling, so that two plugins registering the same name get
an error that names both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from shimmy_core.plugin_manager import ShimmyPluginManager


class DuplicateNameError(ValueError):
    """Two plugins registered the same name for the same kind of thing."""


# kind -> the collection hook that registers it (formats before sources: sources receive them)
KINDS = {
    "backend": "shimmy_register_backends",
    "format": "shimmy_register_formats",
    "source": "shimmy_register_sources",
    "cache": "shimmy_register_caches",
    "tool": "shimmy_register_tools",
    "dialect": "shimmy_register_dialects",
}


@dataclass
class Registry:
    """Everything registered, by kind and name; ``owners`` says which plugin registered what."""

    backends: dict[str, Any] = field(default_factory=dict)
    formats: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)
    caches: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, Any] = field(default_factory=dict)
    dialects: dict[str, Any] = field(default_factory=dict)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)

    def table(self, kind: str) -> dict[str, Any]:
        return {"backend": self.backends, "format": self.formats, "source": self.sources, "cache": self.caches,
                "tool": self.tools, "dialect": self.dialects}[kind]

    def add(self, kind: str, obj: Any, plugin: str) -> None:
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{kind} registered by plugin {plugin!r} has no 'name' string")
        table = self.table(kind)
        if name in table:
            other = self.owners[(kind, name)]
            raise DuplicateNameError(
                f"{kind} name {name!r} is registered by both plugin {other!r} and plugin {plugin!r}"
            )
        table[name] = obj
        self.owners[(kind, name)] = plugin


def build_registry(pm: ShimmyPluginManager, settings: Any) -> Registry:
    """Call every collection hook, one plugin at a time (in load order), and collect the results.

    A plugin whose hook raises is recorded in ``pm.report.failed`` and skipped;
    a name registered twice is fatal (:class:`DuplicateNameError` names both plugins).
    """
    from shimmy_core.plugin_manager import PluginFailure

    registry = Registry()
    for kind, hook_name in KINDS.items():
        hook = getattr(pm.hook, hook_name)
        available = {"settings": settings, "formats": tuple(registry.formats.values())}
        for impl in hook.get_hookimpls():
            register: Callable[[Any], None] = (
                lambda obj, _kind=kind, _plugin=impl.plugin_name: registry.add(_kind, obj, _plugin)
            )
            kwargs = {"register": register, **{a: available[a] for a in impl.argnames if a != "register"}}
            try:
                impl.function(**kwargs)
            except DuplicateNameError:
                raise
            except Exception as exc:
                pm.report.failed.append(
                    PluginFailure(impl.plugin_name, f"{hook_name} raised {type(exc).__name__}: {exc}")
                )
    return registry
