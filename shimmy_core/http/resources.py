"""The core's own routes, the same in every dialect: ``/health`` and ``/metrics``.  Every other
route comes from an API dialect plugin (``shimmy_register_dialects``)."""

from __future__ import annotations

import falcon

from shimmy_core import __version__
from shimmy_core.catalog import ModelManager
from shimmy_core.lifecycle import RETRY_AFTER_SHUTDOWN_S, Lifecycle
from shimmy_core.metrics import Metrics


class HealthResource:
    def __init__(self, manager: ModelManager, lifecycle: Lifecycle | None = None):
        self.manager = manager
        self.lifecycle = lifecycle

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        status = "ok"
        if self.lifecycle is not None and self.lifecycle.draining:
            status = "shutting_down"
            resp.status = falcon.HTTP_503
            resp.set_header("Retry-After", str(RETRY_AFTER_SHUTDOWN_S))
        resp.media = {"status": status, "version": __version__, "models": self.manager.stats()}


class MetricsResource:
    """``GET /metrics``: Prometheus text format."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data, resp.content_type = self.metrics.render()
