"""Prometheus metrics of one server, in a registry of its own (several servers may live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the app

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class ServerMetrics:
    def __init__(self, scheduler):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("ardeploy_requests", "Requests answered, by endpoint and outcome "
                                "(ok, cancelled, client_error, queue_full, server_error)",
                                ["endpoint", "outcome"], registry=registry)
        self.prompt_tokens = Counter("ardeploy_prompt_tokens", "Prompt tokens of requests admitted",
                                     registry=registry)
        self.generated_tokens = Counter("ardeploy_generation_tokens", "Tokens generated (rate() gives tokens/s)",
                                        registry=registry)
        self.ttft = Histogram("ardeploy_time_to_first_token_seconds",
                              "Request received to first token sent, queueing included",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.latency = Histogram("ardeploy_request_duration_seconds", "Request received to last token",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.decode_rate = Histogram("ardeploy_decode_tokens_per_second",
                                     "Per request: tokens after the first / time after the first",
                                     buckets=RATE_BUCKETS, registry=registry)
        stat = lambda key: (lambda: scheduler.stats().get(key, 0))          # noqa: E731
        Gauge("ardeploy_queue_length", "Requests waiting for a row", registry=registry).set_function(stat("queued"))
        Gauge("ardeploy_running_requests", "Requests holding a row of the batch",
              registry=registry).set_function(stat("running"))
        Gauge("ardeploy_batch_capacity", "Rows the scheduler runs at once", registry=registry).set_function(
            stat("max_batch"))
        Gauge("ardeploy_batch_occupancy", "Rows in use / rows available (0..1)", registry=registry).set_function(
            lambda: _occupancy(scheduler.stats()))
        Gauge("ardeploy_decode_steps", "Decode steps the scheduler ran", registry=registry).set_function(
            stat("steps"))

    def finished(self, result, ttft_s: float | None, total_s: float) -> None:
        self.generated_tokens.inc(len(result.token_ids))
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        self.latency.observe(total_s)
        if len(result.token_ids) > 1 and result.decode_tokens_per_s > 0:
            self.decode_rate.observe(result.decode_tokens_per_s)

    def text(self) -> bytes:
        return generate_latest(self.registry)


def _occupancy(stats: dict) -> float:
    return stats.get("running", 0) / max(1, stats.get("max_batch", 1))
