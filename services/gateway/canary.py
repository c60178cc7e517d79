"""Judge a model's canary against production from Prometheus, and act on the verdict.

:func:`compare` reads, for each track over the window (the release's age, at most ``window_s``), what the
gateway recorded of the model's backend calls: calls, error rate (``error``, ``timeout`` and
``circuit_open`` outcomes over all), p95 latency, and for the captioner the alt-text fallback rate (per
caption returned) and the mean caption confidence. :func:`judge` turns that into a verdict with
:class:`CanarySettings` thresholds (``SNAP2CAPTION_RELEASE_*``):

- ``rollback`` as soon as the canary has ``min_breach_requests`` calls and breaches one threshold;
- ``promote`` once the release is ``window_s`` old, the canary had ``min_requests`` calls, and nothing
  breached;
- ``rollback`` after ``max_duration_s`` without enough canary traffic to decide;
- else ``wait``.

:func:`decide` carries a verdict out (registry aliases and the release record) and :func:`watch` loops
until one is final. Every decision is logged and recorded with the numbers it was made on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.gateway.releases import Release, ReleaseError, ReleaseStore, Track

logger = logging.getLogger(__name__)

Verdict = Literal["promote", "rollback", "wait"]
_ERROR_OUTCOMES = "error|timeout|circuit_open"


class CanarySettings(BaseSettings):
    """How a canary is judged (``SNAP2CAPTION_RELEASE_*``)."""

    model_config = SettingsConfigDict(env_prefix="SNAP2CAPTION_RELEASE_", extra="ignore")

    prometheus_url: str = Field(default="http://127.0.0.1:9090", description="Prometheus base URL.")
    window_s: float = Field(
        default=600.0, gt=0, description="How long a canary must run clean before it is promoted."
    )
    poll_interval_s: float = Field(default=15.0, gt=0, description="Seconds between checks of `watch`.")
    max_duration_s: float = Field(
        default=3600.0, gt=0, description="Roll back a canary that got too little traffic by this age."
    )
    min_requests: int = Field(default=200, ge=1, description="Canary calls needed to promote.")
    min_breach_requests: int = Field(default=20, ge=1, description="Canary calls needed to roll back.")
    max_error_rate_increase: float = Field(
        default=0.02, ge=0, description="Largest canary error rate above production's (absolute)."
    )
    max_p95_ratio: float = Field(default=1.5, ge=1, description="Largest canary p95 / production p95.")
    min_p95_increase_s: float = Field(
        default=0.05,
        ge=0,
        description="A p95 ratio breach must also be this many seconds slower (noise on fast models).",
    )
    max_fallback_rate_increase: float = Field(
        default=0.1, ge=0, description="Largest canary alt-text fallback rate above production's."
    )
    max_confidence_drop: float = Field(
        default=0.1, ge=0, description="Largest drop of the mean caption confidence (captioner)."
    )


@dataclass
class TrackStats:
    """What one track did over the window (``None``: no data)."""

    requests: float = 0.0
    error_rate: float | None = None
    p95_s: float | None = None
    fallback_rate: float | None = None
    mean_confidence: float | None = None


@dataclass
class Comparison:
    """Canary against production over ``window_s``, the verdict, and why."""

    model: str
    version: int
    age_s: float
    window_s: float
    production: TrackStats
    canary: TrackStats
    verdict: Verdict = "wait"
    reasons: list[str] = field(default_factory=list)

    def numbers(self) -> dict[str, Any]:
        """Everything the verdict was made on, JSON-ready (recorded with the decision)."""
        return {
            "age_s": round(self.age_s, 1),
            "window_s": round(self.window_s, 1),
            "production": _rounded(asdict(self.production)),
            "canary": _rounded(asdict(self.canary)),
        }

    def summary(self) -> str:
        """One line per track and the verdict, for people."""

        def line(track: str, s: TrackStats) -> str:
            return (
                f"  {track:<10} calls {s.requests:7.0f}  errors {_pct(s.error_rate)}  "
                f"p95 {_ms(s.p95_s)}  fallbacks {_pct(s.fallback_rate)}  confidence {_num(s.mean_confidence)}"
            )

        head = f"{self.model} v{self.version} canary, {self.age_s:.0f} s old, window {self.window_s:.0f} s:"
        tail = f"verdict: {self.verdict}" + (f" ({'; '.join(self.reasons)})" if self.reasons else "")
        return "\n".join([head, line("production", self.production), line("canary", self.canary), tail])


class Prometheus:
    """Instant queries against Prometheus' HTTP API."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def scalar(self, expr: str) -> float | None:
        """The query's single value, or ``None`` when it has none (no series, or NaN from 0/0)."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=self.timeout_s)
        response.raise_for_status()
        result = response.json()["data"]["result"]
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if math.isnan(value) or math.isinf(value) else value


def compare(prometheus: Prometheus, release: Release, settings: CanarySettings) -> Comparison:
    """Read both tracks of the release's model over the window (the release's age, at most ``window_s``)."""
    age = (datetime.now(UTC) - release.started_at).total_seconds()
    window = max(1.0, min(age, settings.window_s))
    stats = {
        track: _track_stats(prometheus, release.model, track, window) for track in ("production", "canary")
    }
    return Comparison(release.model, release.version, age, window, stats["production"], stats["canary"])


def _track_stats(prometheus: Prometheus, model: str, track: Track, window_s: float) -> TrackStats:
    rng = f"[{math.ceil(window_s)}s]"
    calls = f'snap2caption_gateway_backend_requests_total{{backend="{model}",track="{track}"}}'
    errors = (
        f'snap2caption_gateway_backend_requests_total{{backend="{model}",track="{track}",'
        f'outcome=~"{_ERROR_OUTCOMES}"}}'
    )
    requests = prometheus.scalar(f"sum(increase({calls}{rng}))") or 0.0
    stats = TrackStats(requests=requests)
    if requests <= 0:
        return stats
    stats.error_rate = prometheus.scalar(f"sum(increase({errors}{rng})) / sum(increase({calls}{rng}))")
    buckets = f'snap2caption_gateway_backend_duration_seconds_bucket{{backend="{model}",track="{track}"}}'
    stats.p95_s = prometheus.scalar(f"histogram_quantile(0.95, sum by (le) (increase({buckets}{rng})))")
    if model == "captioner":
        selector = f'{{track="{track}"}}{rng}'
        count = f"sum(increase(snap2caption_caption_confidence_count{selector}))"
        total = f"sum(increase(snap2caption_caption_confidence_sum{selector}))"
        stats.mean_confidence = prometheus.scalar(f"{total} / {count}")
        fallbacks = f'sum(increase(snap2caption_alt_text_fallbacks_total{{track="{track}"}}{rng}))'
        stats.fallback_rate = prometheus.scalar(f"{fallbacks} / {count}")
    return stats


def judge(comparison: Comparison, settings: CanarySettings) -> Comparison:
    """Set the comparison's verdict and reasons (see the module docstring); returns it."""
    prod, canary = comparison.production, comparison.canary
    breaches: list[str] = []
    if canary.requests >= settings.min_breach_requests:
        if canary.error_rate is not None:
            base = prod.error_rate or 0.0
            if canary.error_rate - base > settings.max_error_rate_increase:
                limit = settings.max_error_rate_increase
                breaches.append(f"error rate {canary.error_rate:.1%} vs {base:.1%} (max +{limit:.1%})")
        if canary.p95_s is not None and prod.p95_s:
            ratio = canary.p95_s / prod.p95_s
            if ratio > settings.max_p95_ratio and canary.p95_s - prod.p95_s > settings.min_p95_increase_s:
                breaches.append(
                    f"p95 {canary.p95_s * 1000:.0f} ms vs {prod.p95_s * 1000:.0f} ms "
                    f"(x{ratio:.2f} > x{settings.max_p95_ratio:g})"
                )
        if canary.fallback_rate is not None:
            base = prod.fallback_rate or 0.0
            if canary.fallback_rate - base > settings.max_fallback_rate_increase:
                breaches.append(f"fallback rate {canary.fallback_rate:.1%} vs {base:.1%}")
        if canary.mean_confidence is not None and prod.mean_confidence is not None:
            drop = prod.mean_confidence - canary.mean_confidence
            if drop > settings.max_confidence_drop:
                breaches.append(
                    f"mean confidence {canary.mean_confidence:.3f} vs {prod.mean_confidence:.3f} "
                    f"(max drop {settings.max_confidence_drop:g})"
                )
    if breaches:
        comparison.verdict, comparison.reasons = "rollback", breaches
    elif comparison.age_s >= settings.window_s and canary.requests >= settings.min_requests:
        comparison.verdict = "promote"
        comparison.reasons = [
            f"{canary.requests:.0f} canary calls over {comparison.window_s:.0f} s, no breach"
        ]
    elif comparison.age_s >= settings.max_duration_s:
        comparison.verdict = "rollback"
        comparison.reasons = [
            f"only {canary.requests:.0f} canary calls after {comparison.age_s:.0f} s "
            f"(needs {settings.min_requests})"
        ]
    else:
        comparison.verdict, comparison.reasons = "wait", []
    return comparison


def decide(
    store: ReleaseStore,
    registry: Any,
    model: str,
    decision: Literal["promote", "rollback"],
    *,
    automatic: bool,
    reason: str,
    numbers: dict[str, Any] | None = None,
) -> Release:
    """Carry out a decision on the running canary of ``model``: the registry first, then the record.

    ``promote`` points ``production`` at the canary's version (the production service follows its alias);
    ``rollback`` removes the ``canary`` alias. Either way the gateway stops routing to the canary at its
    next read of the releases, as soon as the release is no longer running.

    Args:
        store: The release records.
        registry: The model registry (:class:`snap2caption.registry.Registry`).
        model: ``captioner`` or ``detector``.
        decision: What to do.
        automatic: Taken by ``watch`` (rather than by hand).
        reason: Why, in words.
        numbers: The comparison it was made on.

    Raises:
        ReleaseError: No canary of the model is running.
    """
    release = store.get(model)
    if release is None or not release.running:
        raise ReleaseError(f"no canary of {model} is running")
    # The record ends first: the gateway stops routing to the canary before its alias moves away.
    ended = store.end(model, decision, automatic=automatic, reason=reason, numbers=numbers or {})
    if decision == "promote":
        registry.promote_canary(model)
    else:
        registry.end_canary(model)
    return ended


def watch(
    store: ReleaseStore,
    registry: Any,
    model: str,
    settings: CanarySettings,
    *,
    report: Callable[[Comparison], None] = lambda c: None,
    sleep: Callable[[float], None] = time.sleep,
) -> Comparison:
    """Check the running canary of ``model`` every ``poll_interval_s`` until it is promoted or rolled back.

    Returns:
        The comparison the final decision was made on.

    Raises:
        ReleaseError: No canary of the model is running (or it ended by another hand meanwhile).
    """
    prometheus = Prometheus(settings.prometheus_url)
    while True:
        release = store.get(model)
        if release is None or not release.running:
            raise ReleaseError(f"no canary of {model} is running")
        comparison = judge(compare(prometheus, release, settings), settings)
        report(comparison)
        if comparison.verdict != "wait":
            decide(
                store, registry, model, comparison.verdict,
                automatic=True, reason="; ".join(comparison.reasons), numbers=comparison.numbers(),
            )  # fmt: skip
            return comparison
        sleep(settings.poll_interval_s)


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}


def _pct(value: float | None) -> str:
    return "     -" if value is None else f"{value:6.1%}"


def _ms(value: float | None) -> str:
    return "      -" if value is None else f"{value * 1000:5.0f}ms"


def _num(value: float | None) -> str:
    return "    -" if value is None else f"{value:.3f}"
