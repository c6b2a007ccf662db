"""Prometheus metrics of the service (`GET /metrics`), in a registry of the app's own.

Requests are counted and timed by a plain ASGI middleware (no per-request task), labelled by
endpoint (the route, not the raw path, so item ids do not make new series) and status.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ROUTES = ("/search/text", "/search/image", "/healthz", "/metrics", "/")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def endpoint_of(path: str) -> str:
    if path in ROUTES:
        return path
    if path.startswith("/items/"):
        return "/items/{id}/thumbnail" if path.endswith("/thumbnail") else "/items/{id}"
    return "other"


class ServiceMetrics:
    """The service's metric families, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rshash_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "rshash_request_seconds",
            "Time from request to response (a 503's own time shows what shedding costs)",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "rshash_batch_size", "Queries per batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("rshash_queue_depth", "Queries waiting for a batch", registry=r)
        self.shed = Counter("rshash_shed", "Requests refused with 503 (queue full)", registry=r)
        self.items = Gauge("rshash_index_items", "Items in the index", ["collection"], registry=r)
        self.generation = Gauge("rshash_index_generation", "Index generation served", registry=r)
        self.degraded = Gauge("rshash_degraded_shards", "Shards not answering", registry=r)
        self.cache_hits = Counter(
            "rshash_query_cache_hits", "Text queries answered from the query cache", registry=r
        )
        self.cache_misses = Counter(
            "rshash_query_cache_misses", "Text queries the encoder had to encode", registry=r
        )

    def cache_lookup(self, hits: int, misses: int) -> None:
        self.cache_hits.inc(hits)
        self.cache_misses.inc(misses)


class MetricsMiddleware:
    """Counts and times every HTTP request by endpoint and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = endpoint_of(scope["path"])
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint, str(status)).observe(time.perf_counter() - start)
