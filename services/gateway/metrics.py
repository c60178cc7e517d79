"""The gateway's Prometheus metrics. Dashboards and alert rules are built on these exact names.

Counters are declared without ``_total`` (prometheus-client appends it); every distribution is a
histogram, so replicas aggregate. What a backend answered is labelled ``track``: ``production``, or
``canary`` for a model's canary (``snap2caption release``), so the two can be compared. The breaker
gauge keeps the worst state across workers (``multiprocess_mode="livemax"``: a dead worker's last state
does not linger).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from snap2caption.api import FEATURES
from snap2caption.http.metrics import LATENCY_BUCKETS

BACKEND_REQUESTS = Counter(
    "snap2caption_gateway_backend_requests",
    "Calls from the gateway to a backend, by outcome: ok, error, timeout (the backend's own), "
    "circuit_open, overloaded (the backend shed load: 503), deadline (the request's time ran out), "
    "cancelled (its client left).",
    ["backend", "outcome", "track"],
)
BACKEND_DURATION = Histogram(
    "snap2caption_gateway_backend_duration_seconds",
    "Wall time of one backend call, retries included.",
    ["backend", "track"],
    buckets=LATENCY_BUCKETS,
)
BREAKER_STATE = Gauge(
    "snap2caption_circuit_breaker_state",
    "Circuit breaker state per backend: 0 closed, 1 half-open, 2 open.",
    ["backend", "track"],
    multiprocess_mode="livemax",
)
CAPTION_CONFIDENCE = Histogram(
    "snap2caption_caption_confidence",
    "Confidence of the captions returned (drift signal).",
    ["track"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
)
CAPTION_WORDS = Histogram(
    "snap2caption_caption_words",
    "Words per returned caption.",
    ["track"],
    buckets=(1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30),
)
TAGS_PER_IMAGE = Histogram(
    "snap2caption_tags_per_image",
    "Tags returned per image.",
    ["track"],
    buckets=(0, 1, 2, 3, 5, 8, 10, 20, 50),
)
OBJECTS_PER_IMAGE = Histogram(
    "snap2caption_objects_per_image",
    "Objects returned per image.",
    ["track"],
    buckets=(0, 1, 2, 3, 5, 8, 10, 20, 50, 100),
)
ALT_TEXT_FALLBACKS = Counter(
    "snap2caption_alt_text_fallbacks",
    "Alt texts built from tags and objects because the caption was missing or unsure.",
    ["track"],
)
PARTIAL_RESULTS = Counter(
    "snap2caption_partial_results",
    "Features left out of a 200 response because their backend failed.",
    ["feature", "track"],
)
RATE_LIMIT_SECONDS = Histogram(
    "snap2caption_gateway_rate_limit_seconds",
    "Time one request spends taking its token from the shared rate-limit buckets (a database round trip).",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
RATE_LIMIT_ERRORS = Counter(
    "snap2caption_gateway_rate_limit_errors",
    "Rate-limit checks the database could not answer; those requests were let through.",
)
INPUT_IMAGE_BYTES = Histogram(
    "snap2caption_input_image_bytes",
    "Size of the accepted input images, in bytes.",
    buckets=(1e3, 1e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6, 5e6, 1e7, 2e7, 5e7),
)
INPUT_IMAGE_PIXELS = Histogram(
    "snap2caption_input_image_pixels",
    "Width x height of the accepted input images.",
    buckets=(1e2, 1e4, 1e5, 3e5, 1e6, 2e6, 5e6, 1e7, 2e7, 5e7, 1e8),
)
INPUT_IMAGES = Counter(
    "snap2caption_input_images",
    "Accepted input images, by format.",
    ["format"],
)

RELEASE_CANARY_SHARE = Gauge(
    "snap2caption_release_canary_share",
    "Percent of the traffic a model's running canary gets (0: no canary running).",
    ["model"],
    multiprocess_mode="livemax",
)
RELEASE_CANARY_VERSION = Gauge(
    "snap2caption_release_canary_version",
    "Registry version of a model's running canary (0: none).",
    ["model"],
    multiprocess_mode="livemax",
)
RELEASE_DECISIONS = Gauge(
    "snap2caption_release_decisions",
    "Release decisions recorded so far, by model and decision (start, promote, rollback), automatic or "
    "by hand; read from the gateway database, so every gateway process reports the same total.",
    ["model", "decision"],
    multiprocess_mode="livemax",
)

# Every series a dashboard, alert or canary comparison reads exists from the start (at 0), so rate() and
# increase() see the first event rather than "no data" (a series born at 1 hides its first increase).
for _track in ("production", "canary"):
    for _feature in FEATURES:
        PARTIAL_RESULTS.labels(_feature, _track)
    for _histogram in (CAPTION_CONFIDENCE, CAPTION_WORDS, TAGS_PER_IMAGE, OBJECTS_PER_IMAGE):
        _histogram.labels(_track)
    ALT_TEXT_FALLBACKS.labels(_track)
