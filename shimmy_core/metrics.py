"""Prometheus metrics, in a registry of the app's own (no process-wide globals).

The request middleware records requests, latencies, tokens and cache results;
model gauges (busy slots, queue depth, loaded models) and the prompt tokens a
model's engine really processed are read from the model manager when
``/metrics`` is scraped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:  # pragma: no cover
    from shimmy_core.catalog import ModelManager

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _ModelGauges:
    """Busy slots, queue depth, loaded models and processed prompt tokens, read at scrape time."""

    def __init__(self, manager: "ModelManager"):
        self.manager = manager

    def describe(self):
        return []

    def collect(self):
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
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("shimmy_requests", "HTTP requests answered, by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("shimmy_request_duration_seconds",
                                 "Time from a request's arrival to its last byte (a stream's end), by route.",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("shimmy_time_to_first_token_seconds",
                              "Time from a generation request's arrival to its first generated text.",
                              ["model"], buckets=_TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("shimmy_prompt_tokens", "Prompt tokens processed (cache hits count none).",
                                     ["model"], registry=r)
        self.completion_tokens = Counter("shimmy_completion_tokens",
                                         "Completion tokens generated (cache hits count none).", ["model"],
                                         registry=r)
        self.cache_hits = Counter("shimmy_cache_hits", "Generation requests answered from the response cache.",
                                  registry=r)
        self.cache_misses = Counter("shimmy_cache_misses",
                                    "Generation requests that ran a model (not cacheable, bypassed or not found).",
                                    registry=r)
        r.register(_ModelGauges(manager))

    def render(self) -> bytes:
        return generate_latest(self.registry)
