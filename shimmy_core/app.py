"""The app factory: settings in, a Falcon WSGI app out.  Nothing happens at
import time; everything is built here, once, and shared read-only."""

from __future__ import annotations

from dataclasses import dataclass, field

import falcon

from shimmy_core.http.dialect_kit import DialectServer
from shimmy_core.http.errors import install_error_handler
from shimmy_core.http.resources import HealthResource, MetricsResource
from shimmy_core.http.routes import RouteTable
from shimmy_core.lifecycle import Lifecycle
from shimmy_core.metrics import Metrics
from shimmy_core.http.middleware import build_middleware
from shimmy_core.catalog import ModelCatalog, ModelManager
from shimmy_core.embedding_service import EmbeddingService
from shimmy_core.plugin_manager import ShimmyPluginManager, create_plugin_manager
from shimmy_core.plugin_registry import Registry, build_registry
from shimmy_core.response_cache import OFF, ResponseCache
from shimmy_core.service import CompletionService
from shimmy_core.contract.settings import Settings, SettingsError
from shimmy_core.tools.toolbox import ToolBox

DEFAULT_CACHE = "memory"


@dataclass
class Shimmy:
    """The pieces a running server shares."""

    settings: Settings
    pm: ShimmyPluginManager
    registry: Registry
    catalog: ModelCatalog
    manager: ModelManager
    lifecycle: Lifecycle = field(default_factory=lambda: Lifecycle(10.0))
    cache: ResponseCache | None = None
    metrics: Metrics | None = None
    notes: list[str] = field(default_factory=list)
    tools: ToolBox = field(default_factory=ToolBox)

    def __post_init__(self) -> None:
        if self.cache is None:
            self.cache = ResponseCache(None, self.settings)
        if self.metrics is None:
            self.metrics = Metrics(self.manager)

    def warm_up(self) -> None:
        """What the first requests would otherwise wait for, once the server answers (the start
        itself imports them): the full JSON Schema check of the tools nobody enabled (jsonschema),
        the metrics registry (prometheus_client) and the chat-template engine (Jinja)."""
        self.tools.check_schemas()
        self.metrics.apply()
        import shimmy_core.chat_template  # noqa: F401

    def close(self) -> None:
        try:
            self.manager.close()
        finally:
            self.cache.close()


def select_cache(settings: Settings, registry: Registry) -> tuple[ResponseCache, list[str]]:
    """The cache ``settings.cache`` names.  The default cache missing (its plugin disabled) means
    no cache, with a note; any other name that no plugin registered is a settings error."""
    name = settings.cache
    if name == OFF:
        return ResponseCache(None, settings), []
    if settings.cache_size < 0 or settings.cache_ttl < 0:
        raise SettingsError("--cache-size and --cache-ttl must not be negative")
    cache = registry.caches.get(name)
    if cache is None:
        known = ", ".join(sorted(registry.caches)) or "none"
        if name == DEFAULT_CACHE:
            return ResponseCache(None, settings), [f"no {name!r} cache is registered; responses are not cached"]
        raise SettingsError(f"--cache {name}: no cache plugin registered that name (registered: {known})")
    return ResponseCache(cache, settings), []


def build(settings: Settings, pm: ShimmyPluginManager | None = None) -> Shimmy:
    pm = pm or create_plugin_manager(settings.disable_plugins)
    registry = build_registry(pm, settings)
    catalog = ModelCatalog(registry.sources.values(), aliases=settings.aliases())
    catalog.refresh()
    cache, notes = select_cache(settings, registry)
    notes += catalog.alias_notes()
    lifecycle = Lifecycle(settings.shutdown_grace)
    manager = ModelManager(pm, registry, settings, lifecycle)
    tools = ToolBox.build(registry.tools, registry.owners, settings)  # a ToolConfigError stops the start
    return Shimmy(settings, pm, registry, catalog, manager, lifecycle, cache, Metrics(manager), notes, tools)


def create_app(shimmy: Shimmy) -> falcon.App:
    """The WSGI app: the core's routes, then every registered dialect's (see
    :mod:`shimmy_core.contract.dialect`), behind the middleware and one error handler."""
    settings = shimmy.settings
    routes = RouteTable()
    app = falcon.App(media_type=falcon.MEDIA_JSON,
                     middleware=build_middleware(settings, shimmy.lifecycle, shimmy.metrics, routes))
    app.req_options.strip_url_path_trailing_slash = True
    routes.bind(app)
    install_error_handler(app, routes)
    routes.add("/health", HealthResource(shimmy.manager, shimmy.lifecycle), open=True)
    routes.add("/metrics", MetricsResource(shimmy.metrics))
    server = DialectServer(settings, CompletionService(shimmy.catalog, shimmy.manager, settings, shimmy.tools),
                           shimmy.catalog, shimmy.manager, shimmy.cache, shimmy.lifecycle, shimmy.tools, shimmy.metrics,
                           EmbeddingService(shimmy.catalog, shimmy.manager, settings, shimmy.lifecycle))
    for dialect in shimmy.registry.dialects.values():
        routes.add_dialect(dialect, server)
    return app
