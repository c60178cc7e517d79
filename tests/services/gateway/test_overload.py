"""A backend shedding load (503 ``overloaded``) is backpressure, not failure, through a real gateway process
in front of scripted backend processes (``fake_backend``): the circuit stays closed and the client gets
503 with the backend's Retry-After, or the partial result when the other backend answered; 500s, timeouts
and refused connections still open the circuit. Each test has its own gateway, as an open circuit stays
open for the rest of a gateway's life here (60 s cooldown)."""

from __future__ import annotations

import pytest

from tests.gateway_stack import assert_envelope, metric, post_analyze
from tests.helpers import free_port, image_bytes
from tests.services.gateway.fake_backend import Fakes, fakes, healthy  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration

BREAKER = {"breaker_failure_threshold": "2", "breaker_cooldown_s": "60", "backend_timeout_s": "0.5"}
CAPTION_ONLY = {"features": "caption"}


def breaker(url: str, backend: str) -> float | None:
    return metric(url, "snap2caption_circuit_breaker_state", backend=backend)


def calls(url: str, backend: str, outcome: str) -> float:
    return metric(url, "snap2caption_gateway_backend_requests_total", backend=backend, outcome=outcome) or 0


def test_a_burst_of_overloaded_answers_never_opens_the_breaker_but_500s_do(
    healthy: Fakes,  # noqa: F811
) -> None:
    gateway = healthy.gateway(**BREAKER)
    try:
        url = gateway.url
        healthy.captioner.behave(status=503, code="overloaded", retry_after=7)
        for _ in range(10):  # five times the threshold
            response = post_analyze(url, image_bytes("red"), params=CAPTION_ONLY)
            assert "overloaded" in assert_envelope(response, 503, "overloaded")["message"]
            assert response.headers["retry-after"] == "7"  # the backend's own, passed on
            assert breaker(url, "captioner") == 0
        assert calls(url, "captioner", "overloaded") == 10
        assert calls(url, "captioner", "error") == 0

        # The detector answers: the partial-result rule, with the overloaded feature named.
        response = post_analyze(url, image_bytes("red"))
        assert response.status_code == 200, response.text
        body = response.json()
        assert [(e["feature"], e["code"]) for e in body["errors"]] == [("caption", "overloaded")]
        assert body["tags"] and body["objects"] and body["alt_text"]["source"] == "fallback"

        # A backend that fails is still switched off after the threshold.
        healthy.captioner.behave(status=500, code="internal_error")
        for _ in range(2):
            assert_envelope(post_analyze(url, image_bytes("red"), params=CAPTION_ONLY), 503, "overloaded")
        assert breaker(url, "captioner") == 2
        response = post_analyze(url, image_bytes("red"), params={"features": "caption,tags"})
        assert [(e["feature"], e["code"]) for e in response.json()["errors"]] == [("caption", "circuit_open")]
    finally:
        gateway.stop(timeout_s=10)


def test_timeouts_and_refused_connections_still_open_the_breaker(
    healthy: Fakes,  # noqa: F811
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = healthy.gateway(wait="live", captioner_url=dead, request_timeout_s="5", **BREAKER)
    try:
        url = gateway.url
        healthy.detector.behave(delay_s=30)  # far past the 0.5 s backend timeout, well within the budget
        for _ in range(2):
            response = post_analyze(url, image_bytes("red"))
            assert_envelope(response, 503, "overloaded")  # the backends' own failures: not a deadline
            assert int(response.headers["retry-after"]) >= 1
        assert breaker(url, "captioner") == 2 and breaker(url, "detector") == 2
        assert calls(url, "detector", "timeout") == 2
        assert calls(url, "captioner", "error") == 2
    finally:
        gateway.stop(timeout_s=10)
