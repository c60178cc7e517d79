"""Prometheus metrics shared by every service, correct under several uvicorn workers.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``snap2caption.http.run`` sets it when ``workers > 1``),
prometheus-client keeps each worker's values in files there and ``/metrics`` sums them, so any
worker answers a scrape with the totals of all. The variable must be set before this module is
imported, which is why ``run`` sets it before uvicorn starts the workers.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# `_created` series double what is scraped and no dashboard here reads them.
disable_created_metrics()

# Latency buckets around the 200 ms target, with room for slow outliers.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)

HTTP_REQUESTS = Counter(
    "snap2caption_http_requests",
    "HTTP requests served, by route template (never the raw path), status and release track (`production`, "
    "or `canary` for a gateway request a model's canary answered and for a model service serving the "
    "`canary` alias).",
    ["service", "route", "method", "status", "track"],
)
HTTP_DURATION = Histogram(
    "snap2caption_http_request_duration_seconds",
    "Time from the first byte of the request to the end of the response (not observed for 408 and 499: "
    "how long a slow or departed client took says nothing about the service), by release track.",
    ["service", "route", "method", "track"],
    buckets=LATENCY_BUCKETS,
)
HTTP_CLIENT_DISCONNECTS = Counter(
    "snap2caption_http_client_disconnects",
    "Requests the client abandoned before the response was complete (status 499 in "
    "snap2caption_http_requests), by phase: `upload` (sending the body) or `processing` (awaiting "
    "the answer).",
    ["service", "phase"],
)
HTTP_SLOW_BODIES = Counter(
    "snap2caption_http_slow_bodies",
    "Request bodies cut with 408 `request_timeout`, by reason: `min_rate` (arriving too slowly after the "
    "grace period) or `max_time` (taking longer than the longest upload allowed).",
    ["service", "reason"],
)
HTTP_IN_FLIGHT = Gauge(
    "snap2caption_http_requests_in_flight",
    "Requests being served now.",
    ["service"],
    multiprocess_mode="livesum",
)

READY = Gauge(
    "snap2caption_ready",
    "1 while /readyz would answer 200 (refreshed by every /readyz call and every scrape), else 0.",
    ["service"],
    multiprocess_mode="livemostrecent",
)


def multiprocess_enabled() -> bool:
    """Whether metrics are kept in per-process files (several workers)."""
    return bool(os.environ.get(MULTIPROC_ENV))


def render_metrics() -> tuple[bytes, str]:
    """The exposition text of every metric of this process, or of all workers in multiprocess mode.

    Returns:
        ``(body, content_type)``.
    """
    if multiprocess_enabled():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_worker_dead() -> None:
    """Drop this worker's live gauges from the shared files when it exits (multiprocess mode only)."""
    if multiprocess_enabled():
        multiprocess.mark_process_dead(os.getpid())
