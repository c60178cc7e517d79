"""The canary's pure parts: the per-request track bucket and the verdict from the comparison's numbers."""

from __future__ import annotations

from services.gateway.canary import CanarySettings, Comparison, TrackStats, judge
from services.gateway.releases import bucket

SETTINGS = CanarySettings(window_s=60, min_requests=100, min_breach_requests=20, max_duration_s=600)


def _comparison(canary: TrackStats, age_s: float = 30.0) -> Comparison:
    production = TrackStats(requests=900, error_rate=0.0, p95_s=0.1, fallback_rate=0.05, mean_confidence=0.8)
    return Comparison("captioner", 2, age_s, min(age_s, 60.0), production, canary)


def test_the_bucket_is_a_deterministic_exact_share_of_request_ids() -> None:
    ids = [f"req-{i}" for i in range(20_000)]
    assert [bucket(i) for i in ids[:50]] == [bucket(i) for i in ids[:50]]
    share = sum(bucket(i) < 10 for i in ids) / len(ids)
    assert 0.09 < share < 0.11  # 10% +- 1 point over 20,000 ids (the hash is uniform; fixed ids)


def test_breaches_roll_back_and_a_clean_window_promotes() -> None:
    healthy = TrackStats(requests=150, error_rate=0.0, p95_s=0.11, fallback_rate=0.05, mean_confidence=0.79)
    assert judge(_comparison(healthy), SETTINGS).verdict == "wait"  # not 60 s old yet
    assert judge(_comparison(healthy, age_s=61), SETTINGS).verdict == "promote"
    errors = TrackStats(requests=25, error_rate=0.5, p95_s=0.1, fallback_rate=0.05, mean_confidence=0.8)
    verdict = judge(_comparison(errors), SETTINGS)
    assert verdict.verdict == "rollback" and "error rate" in verdict.reasons[0]
    slow = TrackStats(requests=25, error_rate=0.0, p95_s=0.5, fallback_rate=0.05, mean_confidence=0.8)
    assert "p95" in judge(_comparison(slow), SETTINGS).reasons[0]
    unsure = TrackStats(requests=25, error_rate=0.0, p95_s=0.1, fallback_rate=0.3, mean_confidence=0.5)
    assert len(judge(_comparison(unsure), SETTINGS).reasons) == 2  # fallbacks and confidence
    few = TrackStats(requests=5, error_rate=1.0, p95_s=1.0)
    assert judge(_comparison(few), SETTINGS).verdict == "wait"  # too few calls to judge
    assert judge(_comparison(few, age_s=601), SETTINGS).verdict == "rollback"  # never got the traffic
