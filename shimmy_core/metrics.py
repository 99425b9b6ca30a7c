"""Prometheus metrics, in a registry of the app's own (no process-wide globals).

The request middleware records each request's route, status, latency, tokens and cache result
(:meth:`Metrics.record`); model gauges (busy slots, queue depth, loaded models) and the prompt
tokens a model's engine really processed are read from the model manager when ``/metrics`` is
scraped.  prometheus_client is imported when the records are first applied (by the server's
warm-up after it starts, a scrape, or a full queue of records), not by the start itself.
"""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from shimmy_core.catalog import ModelManager

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_PENDING_LIMIT = 1024   # records waiting to be applied before the recording thread applies them


class _ModelGauges:
    """Busy slots, queue depth, loaded models and processed prompt tokens, read at scrape time."""

    def __init__(self, manager: "ModelManager"):
        self.manager = manager

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        busy = GaugeMetricFamily("shimmy_busy_slots", "Sequences generating now, per loaded model.",
                                 labels=["model"])
        queued = GaugeMetricFamily("shimmy_queue_depth", "Requests waiting for a free slot, per loaded model.",
                                   labels=["model"])
        decoded = CounterMetricFamily(
            "shimmy_prompt_tokens_decoded", "Prompt tokens a loaded model processed since it was loaded; "
            "tokens whose KV cells were reused count none (GGUF).", labels=["model"])
        stats = self.manager.stats()
        for entry in stats:
            name = str(entry.get("id") or entry.get("path"))
            busy.add_metric([name], float(entry.get("busy_slots", 0)))
            queued.add_metric([name], float(entry.get("queued", 0)))
            if "prompt_tokens_decoded" in entry:
                decoded.add_metric([name], float(entry["prompt_tokens_decoded"]))
        loaded = GaugeMetricFamily("shimmy_loaded_models", "Models loaded in memory.", value=len(stats))
        return [busy, queued, decoded, loaded]


class Metrics:
    def __init__(self, manager: "ModelManager"):
        self.manager = manager
        self._pending: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._families: Any = None

    def record(self, route: str, method: str, status: int, elapsed: float, model: str | None = None,
               usage: tuple[int, int] | None = None, cache: str | None = None, ttft: float | None = None) -> None:
        """One answered request (cheap: applied to the counters later, in a batch)."""
        self._pending.append((route, method, status, elapsed, model, usage, cache, ttft))
        if len(self._pending) > _PENDING_LIMIT:
            self.apply()

    def apply(self) -> None:
        """Apply the waiting records (the first call creates the Prometheus registry)."""
        with self._lock:
            m = self._families or self._create()
            while self._pending:
                route, method, status, elapsed, model, usage, cache, ttft = self._pending.popleft()
                m["requests"].labels(route, method, str(status)).inc()
                m["latency"].labels(route).observe(elapsed)
                if cache == "hit":
                    m["cache_hits"].inc()
                elif cache == "miss" and status < 400:
                    m["cache_misses"].inc()
                    if model and usage:
                        m["prompt_tokens"].labels(model).inc(usage[0])
                        m["completion_tokens"].labels(model).inc(usage[1])
                    if model and ttft is not None:
                        m["ttft"].labels(model).observe(ttft)

    def _create(self) -> dict[str, Any]:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        r = CollectorRegistry()
        self._families = {
            "registry": r,
            "requests": Counter("shimmy_requests", "HTTP requests answered, by route, method and status.",
                                ["route", "method", "status"], registry=r),
            "latency": Histogram("shimmy_request_duration_seconds",
                                 "Time from a request's arrival to its last byte (a stream's end), by route.",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r),
            "ttft": Histogram("shimmy_time_to_first_token_seconds",
                              "Time from a generation request's arrival to its first generated text.",
                              ["model"], buckets=_TTFT_BUCKETS, registry=r),
            "prompt_tokens": Counter("shimmy_prompt_tokens", "Prompt tokens processed (cache hits count none).",
                                     ["model"], registry=r),
            "completion_tokens": Counter("shimmy_completion_tokens",
                                         "Completion tokens generated (cache hits count none).", ["model"],
                                         registry=r),
            "cache_hits": Counter("shimmy_cache_hits", "Generation requests answered from the response cache.",
                                  registry=r),
            "cache_misses": Counter("shimmy_cache_misses",
                                    "Generation requests that ran a model (not cacheable, bypassed or not found).",
                                    registry=r),
        }
        r.register(_ModelGauges(self.manager))
        return self._families

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        from prometheus_client import generate_latest
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        self.apply()
        return generate_latest(self._families["registry"]), CONTENT_TYPE_LATEST
