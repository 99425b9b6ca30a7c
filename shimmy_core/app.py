"""The app factory: settings in, a Falcon WSGI app out.  Nothing happens at
import time; everything is built here, once, and shared read-only."""

from __future__ import annotations

from dataclasses import dataclass

import falcon

from shimmy_core.api import GenerationResource, HealthResource, ModelsResource
from shimmy_core.models import ModelCatalog, ModelManager
from shimmy_core.openai_api.errors import add_error_handlers
from shimmy_core.plugin_manager import ShimmyPluginManager, create_plugin_manager
from shimmy_core.registry import Registry, build_registry
from shimmy_core.service import CompletionService
from shimmy_core.settings import Settings


@dataclass
class Shimmy:
    """The pieces a running server shares."""

    settings: Settings
    pm: ShimmyPluginManager
    registry: Registry
    catalog: ModelCatalog
    manager: ModelManager

    def close(self) -> None:
        self.manager.close()


def build(settings: Settings, pm: ShimmyPluginManager | None = None) -> Shimmy:
    pm = pm or create_plugin_manager(settings.disable_plugins)
    registry = build_registry(pm, settings)
    catalog = ModelCatalog(registry.sources.values())
    catalog.refresh()
    return Shimmy(settings, pm, registry, catalog, ModelManager(pm, registry, settings))


def create_app(shimmy: Shimmy) -> falcon.App:
    app = falcon.App(media_type=falcon.MEDIA_JSON)
    app.req_options.strip_url_path_trailing_slash = True
    add_error_handlers(app)
    service = CompletionService(shimmy.catalog, shimmy.manager, shimmy.settings)
    models = ModelsResource(shimmy.catalog)
    app.add_route("/health", HealthResource(shimmy.manager))
    app.add_route("/v1/models", models)
    app.add_route("/v1/models/{model_id:path}", models, suffix="one")
    app.add_route("/v1/chat/completions", GenerationResource("chat", service, shimmy.settings))
    app.add_route("/v1/completions", GenerationResource("completion", service, shimmy.settings))
    return app
