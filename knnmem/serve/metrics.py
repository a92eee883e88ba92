"""What the server counts, in Prometheus' text format at `GET /metrics`.

Each app has a registry of its own, so several servers (tests) in one process count separately.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # the *_created series would double the page, and rates need only the counters

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: from a few tokens of the test model to long answers of the default model on a CPU.
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("knnmem_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("knnmem_prompt_tokens", "Prompt tokens read", registry=r)
        self.completion_tokens = Counter("knnmem_completion_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("knnmem_queue_depth", "Requests waiting for a generation slot", registry=r)
        self.in_flight = Gauge("knnmem_in_flight", "Requests generating now", registry=r)
        self.rejected = Counter("knnmem_rejected", "Requests refused because the queue was full or the server "
                                "was shutting down", ["reason"], registry=r)
        self.cancelled = Counter("knnmem_cancelled", "Generations cancelled (client gone, or shutdown)", registry=r)
        self.latency = Histogram("knnmem_request_seconds", "Time from a request's arrival to its last token",
                                 ["endpoint"], buckets=_LATENCY, registry=r)
        self.first_token = Histogram("knnmem_time_to_first_token_seconds", "Time from a request's arrival to its "
                                     "first generated token", ["endpoint"], buckets=_LATENCY, registry=r)
        self.queue_wait = Histogram("knnmem_queue_wait_seconds", "Time a request waited for a generation slot",
                                    buckets=_LATENCY, registry=r)
        self.search = Histogram("knnmem_memory_search_seconds", "Time one request spent searching memory "
                                "(every memory layer and step)", buckets=_LATENCY, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
