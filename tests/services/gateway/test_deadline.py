"""The end-to-end deadline of /v1/analyze and /v1/analyze/batch, through a real gateway process in front of
scripted backend processes (``fake_backend``) that answer after 30 s when a test says so.

The gateway here: a 1 s default budget, at most 1.5 s on request, and 2 s per backend call, so every cut
below is the request's deadline, never a backend's own timeout. Time bounds: a cut request must answer
within 10 s (it waits for its budget, 0.5-1.5 s; the alternative is the backend's 30 s), and never before
its budget (the gateway cannot know the answer earlier), so neither bound depends on the machine's load.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.gateway_stack import assert_envelope, metric, post_analyze
from tests.helpers import ServiceProcess, image_bytes
from tests.services.gateway.fake_backend import Fakes, fakes, healthy  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration

SLOW_S = 30.0  # a backend this slow never answers within any budget below
BUDGET = {"backend_timeout_s": "2", "request_timeout_s": "1", "max_timeout_s": "1.5"}
BREAKER = {"breaker_failure_threshold": "2", "breaker_cooldown_s": "60"}


@pytest.fixture(scope="module")
def gateway(fakes: Fakes) -> Iterator[ServiceProcess]:  # noqa: F811
    service = fakes.gateway(**BUDGET, **BREAKER, allow_private_urls="true")
    yield service
    service.stop(timeout_s=10)


def timed(url: str, **kwargs: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = post_analyze(url, image_bytes("red"), **kwargs)
    return response, time.monotonic() - started


def breaker(url: str, backend: str) -> float | None:
    return metric(url, "snap2caption_circuit_breaker_state", backend=backend)


def test_a_slow_backend_is_cut_at_the_budget_and_the_other_still_answers(
    healthy: Fakes,  # noqa: F811
    gateway: ServiceProcess,
) -> None:
    healthy.captioner.behave(delay_s=SLOW_S)
    for _ in range(3):  # past the breaker's threshold of 2: a caller's budget is no verdict on a backend
        response, elapsed = timed(gateway.url, params={"timeout_ms": "500"})
        assert response.status_code == 200, response.text
        assert 0.5 <= elapsed < 10
        body = response.json()
        assert body["caption"] is None
        assert [(e["feature"], e["code"]) for e in body["errors"]] == [("caption", "timeout")]
        assert body["tags"][0]["name"] == "tabby" and body["objects"][0]["label"] == "cat"
        assert body["alt_text"]["source"] == "fallback"
    # The captioner was told the budget it had, so it too could drop the work.
    assert all(0 < ms <= 500 for ms in healthy.captioner.seen()["timeout_ms"])
    assert breaker(gateway.url, "captioner") == 0
    deadline = metric(
        gateway.url, "snap2caption_gateway_backend_requests_total", backend="captioner", outcome="deadline"
    )
    assert deadline is not None and deadline >= 3


def test_nothing_computed_by_the_deadline_is_504(
    healthy: Fakes,  # noqa: F811
    gateway: ServiceProcess,
) -> None:
    healthy.captioner.behave(delay_s=SLOW_S)
    healthy.detector.behave(delay_s=SLOW_S)
    response, elapsed = timed(gateway.url, params={"timeout_ms": "500"})
    error = assert_envelope(response, 504, "timeout")
    assert "time ran out" in error["message"]
    assert 0.5 <= elapsed < 10
    # No timeout_ms: the gateway's default budget (1 s).
    response, elapsed = timed(gateway.url)
    assert_envelope(response, 504, "timeout")
    assert 1.0 <= elapsed < 10
    # More than the maximum is capped to it (1.5 s), not refused.
    response, elapsed = timed(gateway.url, params={"timeout_ms": "600000"})
    assert_envelope(response, 504, "timeout")
    assert 1.5 <= elapsed < 10
    assert max(healthy.captioner.seen()["timeout_ms"]) <= 1500
    assert breaker(gateway.url, "captioner") == 0 and breaker(gateway.url, "detector") == 0


def test_a_slow_url_fetch_is_cut_at_the_budget(healthy: Fakes, gateway: ServiceProcess) -> None:  # noqa: F811
    url = f"{healthy.detector.url}/image.png"
    assert post_analyze(gateway.url, json={"url": url}).status_code == 200  # the host answers at once
    healthy.detector.behave(delay_s=SLOW_S)
    started = time.monotonic()
    response = post_analyze(gateway.url, json={"url": url}, params={"timeout_ms": "500"})
    assert "fetching the URL" in assert_envelope(response, 504, "timeout")["message"]
    assert 0.5 <= time.monotonic() - started < 10


@pytest.mark.parametrize("path", ["/v1/analyze", "/v1/analyze/batch"])
@pytest.mark.parametrize("value", ["0", "-5", "abc", "1.5", "600001"])
def test_a_bad_timeout_ms_is_400(gateway: ServiceProcess, path: str, value: str) -> None:
    files = [("files", ("a.png", image_bytes("red"), "image/png"))]
    response = post_analyze(gateway.url, path=path, files=files, params={"timeout_ms": value})
    assert "timeout_ms" in assert_envelope(response, 400, "bad_request")["message"]


def test_a_batch_shares_one_budget(
    healthy: Fakes,  # noqa: F811
    gateway: ServiceProcess,
) -> None:
    files = [("files", (f"{c}.png", image_bytes(c), "image/png")) for c in ("red", "blue")]
    healthy.captioner.behave(delay_s=SLOW_S)
    started = time.monotonic()
    response = post_analyze(gateway.url, path="/v1/analyze/batch", files=files, params={"timeout_ms": "500"})
    assert time.monotonic() - started < 10
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [item["result"]["errors"][0]["code"] for item in items] == ["timeout", "timeout"]
    assert all(item["result"]["tags"] for item in items)

    healthy.detector.behave(delay_s=SLOW_S)
    response = post_analyze(gateway.url, path="/v1/analyze/batch", files=files, params={"timeout_ms": "500"})
    assert_envelope(response, 504, "timeout")
