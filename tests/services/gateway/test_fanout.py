"""Fan-out under failure and load, through real processes: partial results when a backend dies mid-request,
the circuit breaker, 503 when nothing answers, readiness per backend, 50 concurrent clients, API keys,
rate limits, CORS and the metrics dashboards rely on."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import threading
import time
from typing import Any

import httpx
import pytest
from PIL import Image

from services.gateway.db import make_engine
from tests.gateway_stack import (
    CAPTIONS,
    COLOURS,
    Stack,
    assert_envelope,
    colour_png,
    metric,
    noise_png,
    post_analyze,
)
from tests.helpers import free_port, wait_for

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.integration


def test_readyz_reports_each_backend(stack: Stack) -> None:
    response = httpx.get(f"{stack.gateway.url}/readyz", timeout=5)
    assert response.status_code == 200
    checks = response.json()["checks"]
    for name, service in (("captioner", stack.captioner), ("detector", stack.detector)):
        assert checks[name]["ready"] is True
        assert checks[name]["url"] == service.url
        assert checks[name]["circuit"] == "closed"
        assert checks[name]["last_ok_age_s"] < 10
    # The stack's tiny captioner carries no domain description: the gateway says so (its answers then
    # have in_domain null and count as in domain).
    assert checks["captioner"]["domain_models"] == {"captioner": False}


def test_fifty_concurrent_clients_get_no_5xx_and_no_mix_ups(stack: Stack) -> None:
    colours = list(COLOURS)[:3]  # the captions with words to check

    async def client(i: int, http: httpx.AsyncClient) -> tuple[int, str, dict[str, Any]]:
        colour = colours[i % len(colours)]
        response = await http.post(
            "/v1/analyze",
            content=colour_png(colour),
            headers={"content-type": "image/png"},
            params={"features": "caption,alt_text,tags"},
        )
        return response.status_code, colour, response.json()

    async def run() -> list[tuple[int, str, dict[str, Any]]]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=60, limits=limits) as http:
            return await asyncio.gather(*(client(i, http) for i in range(50)))

    started = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - started
    statuses = [status for status, _, _ in results]
    assert statuses == [200] * 50, statuses
    for _, colour, body in results:
        assert body["errors"] == []
        assert body["caption"]["text"] == CAPTIONS[list(COLOURS).index(colour)]  # each got its own answer
        assert body["tags"]
    assert len({body["request_id"] for _, _, body in results}) == 50
    logger.info("50 concurrent /v1/analyze on the tiny stack: %.2f s", elapsed)


@pytest.mark.slow  # starts its own captioner (the one it kills): tens of seconds on 2 cores
def test_backend_killed_mid_request_gives_partial_results_and_opens_the_breaker(stack: Stack) -> None:
    # A captioner whose pixel cap is far below the gateway's, so it refuses some images the gateway accepts.
    victim = stack.start_captioner(max_image_pixels="1000")
    gateway = stack.start_gateway(
        captioner_url=victim.url,
        breaker_failure_threshold="1",
        breaker_cooldown_s="60",
        retries="1",
        ready_max_age_s="1",
    )
    # A backend's refusal of the image is the caller's error, with the backend's status and code.
    refused = post_analyze(gateway.url, noise_png(64, 48, 6))  # 3,072 pixels: over the captioner's cap
    assert "pixels" in assert_envelope(refused, 413, "image_too_large")["message"]
    assert metric(gateway.url, "snap2caption_circuit_breaker_state", backend="captioner") == 0

    # Stopped (SIGSTOP), the captioner still takes the call (the kernel accepts and buffers it) but never
    # answers, so the caption is surely pending when it is killed, however long the steps below take.
    os.kill(victim.pid, signal.SIGSTOP)
    detector_calls = ("snap2caption_gateway_backend_requests_total", {"backend": "detector", "outcome": "ok"})
    detector_before = metric(gateway.url, detector_calls[0], **detector_calls[1]) or 0
    outcome: dict[str, httpx.Response] = {}
    image = noise_png(30, 30, 7)  # 900 pixels: the captioner takes it
    request = threading.Thread(target=lambda: outcome.setdefault("r", post_analyze(gateway.url, image)))
    request.start()
    # The gateway sends its two calls at once; once the detector has answered its own, the caption call
    # went out long before.
    wait_for(
        lambda: (metric(gateway.url, detector_calls[0], **detector_calls[1]) or 0) >= detector_before + 1,
        timeout_s=30,
        what="the detector's answers to the gateway",
    )
    victim.kill()  # SIGKILL while the caption is pending
    request.join(30)

    response = outcome["r"]
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["caption"] is None
    assert body["tags"] and body["objects"]  # the detector still answered
    assert body["alt_text"]["source"] == "fallback"
    assert body["alt_text"]["text"].startswith("Image may contain: ")
    assert body["alt_text"]["text"].endswith(".")
    assert body["tags"][0]["name"] in body["alt_text"]["text"]
    assert [(e["feature"], e["code"]) for e in body["errors"]] == [("caption", "backend_unavailable")]
    assert "models" in body and "caption" not in body["models"]

    url = gateway.url
    assert metric(url, "snap2caption_circuit_breaker_state", backend="captioner") == 2
    assert metric(url, "snap2caption_circuit_breaker_state", backend="detector") == 0
    assert (
        metric(url, "snap2caption_gateway_backend_requests_total", backend="captioner", outcome="error") == 1
    )
    assert metric(url, "snap2caption_partial_results_total", feature="caption") == 1
    assert metric(url, "snap2caption_alt_text_fallbacks_total") == 1

    # Open circuit: the next request does not even try the dead captioner.
    started = time.monotonic()
    again = post_analyze(url, noise_png(64, 48, 8), params={"features": "caption,tags"})
    assert time.monotonic() - started < 5
    assert again.status_code == 200
    assert [(e["feature"], e["code"]) for e in again.json()["errors"]] == [("caption", "circuit_open")]
    assert (
        metric(
            url, "snap2caption_gateway_backend_requests_total", backend="captioner", outcome="circuit_open"
        )
        == 1
    )

    # Only the dead backend's feature asked for: nothing computable, 503 with Retry-After.
    only_caption = post_analyze(url, colour_png("red"), params={"features": "caption"})
    error = assert_envelope(only_caption, 503, "overloaded")
    assert "captioner" in error["message"]
    assert int(only_caption.headers["retry-after"]) >= 1

    # Readiness follows the backends.
    wait_for(
        lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 503,
        timeout_s=15,
        what="readyz to turn 503",
    )
    checks = httpx.get(f"{url}/readyz", timeout=5).json()["error"]["details"]["checks"]
    assert checks["captioner"]["ready"] is False and checks["captioner"]["circuit"] == "open"
    assert checks["detector"]["ready"] is True


def test_no_backend_at_all_is_503_and_not_ready(stack: Stack) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = stack.start_gateway(wait="live", captioner_url=dead, detector_url=dead)
    assert httpx.get(f"{gateway.url}/healthz", timeout=5).status_code == 200
    ready = httpx.get(f"{gateway.url}/readyz", timeout=5)
    error = assert_envelope(ready, 503, "not_ready")
    assert set(error["details"]["checks"]) == {"captioner", "detector"}
    assert "unreachable" in error["details"]["checks"]["captioner"]["detail"]
    response = post_analyze(gateway.url, colour_png("red"))
    assert_envelope(response, 503, "overloaded")
    assert int(response.headers["retry-after"]) >= 1
    # Bad input is still the caller's error, not the backends'.
    assert_envelope(post_analyze(gateway.url, b"text"), 415, "unsupported_format")
    batch = post_analyze(
        gateway.url, path="/v1/analyze/batch", files=[("files", ("a.png", colour_png("red"), "image/png"))]
    )
    assert_envelope(batch, 503, "overloaded")


def test_api_keys_rate_limit_and_cors(stack: Stack) -> None:
    from services.gateway.auth import KeyStore

    db_url = f"sqlite:///{stack.workdir / 'auth.db'}"
    store = KeyStore(make_engine(db_url))
    _, secret = store.create("test client")
    origin = "https://app.example"
    gateway = stack.start_gateway(
        auth_enabled="true",
        database_url=db_url,
        rate_limit_per_s="0.05",
        rate_limit_burst="2",
        cors_allow_origins=origin,
    )
    url = gateway.url
    image = colour_png("red")
    params = {"features": "caption"}
    assert_envelope(post_analyze(url, image, params=params), 401, "unauthorized")
    bad = {"content-type": "image/png", "authorization": "Bearer s2c_nope_nope"}
    assert_envelope(post_analyze(url, image, headers=bad, params=params), 401, "unauthorized")

    bearer = {"content-type": "image/png", "authorization": f"Bearer {secret}"}
    assert post_analyze(url, image, headers=bearer, params=params).status_code == 200
    x_api_key = {"content-type": "image/png", "x-api-key": secret, "origin": origin}
    ok = post_analyze(url, image, headers=x_api_key, params=params)
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == origin
    limited = post_analyze(url, image, headers=x_api_key, params=params)  # burst of 2 spent
    assert_envelope(limited, 429, "rate_limited")
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["access-control-allow-origin"] == origin  # errors carry CORS headers too
    # Batch and feedback are behind the key too; ops routes and docs are not.
    assert_envelope(
        post_analyze(url, path="/v1/analyze/batch", json={"urls": ["http://a/b"]}), 401, "unauthorized"
    )
    assert_envelope(post_analyze(url, path="/v1/feedback", json={}), 401, "unauthorized")
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert httpx.get(f"{url}{path}", timeout=5).status_code == 200, path

    preflight = httpx.options(
        f"{url}/v1/analyze",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "x-api-key",
        },
        timeout=5,
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == origin
    evil = httpx.options(
        f"{url}/v1/analyze",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        timeout=5,
    )
    assert "access-control-allow-origin" not in evil.headers


METRIC_NAMES = [
    "snap2caption_gateway_backend_requests_total",
    "snap2caption_gateway_backend_duration_seconds_bucket",
    "snap2caption_circuit_breaker_state",
    "snap2caption_caption_confidence_bucket",
    "snap2caption_caption_words_bucket",
    "snap2caption_tags_per_image_bucket",
    "snap2caption_objects_per_image_bucket",
    "snap2caption_input_image_bytes_bucket",
    "snap2caption_input_image_pixels_bucket",
    "snap2caption_input_images_total",
]


def test_metrics_have_the_names_dashboards_use(stack: Stack) -> None:
    before = metric(stack.gateway.url, "snap2caption_input_images_total", format="gif") or 0
    frame = noise_png(32, 32, 9)
    buffer = io.BytesIO()
    Image.open(io.BytesIO(frame)).convert("P").save(buffer, format="GIF")
    assert stack.analyze(buffer.getvalue()).status_code == 200
    text = httpx.get(f"{stack.gateway.url}/metrics", timeout=5).text
    for name in METRIC_NAMES:
        assert f"\n{name}" in text, name
    assert "# TYPE snap2caption_caption_confidence histogram" in text
    assert "# TYPE snap2caption_alt_text_fallbacks_total counter" in text
    assert "# TYPE snap2caption_partial_results_total counter" in text
    for feature in ("caption", "alt_text", "tags", "objects"):  # series exist before any failure
        assert metric(stack.gateway.url, "snap2caption_partial_results_total", feature=feature) is not None
    assert metric(stack.gateway.url, "snap2caption_input_images_total", format="gif") == before + 1
    assert metric(
        stack.gateway.url, "snap2caption_gateway_backend_requests_total", backend="detector", outcome="ok"
    )


@pytest.mark.parametrize("path", ["/v1/analyze", "/v1/analyze/batch"])
def test_request_id_is_kept_and_returned(stack: Stack, path: str) -> None:
    response = post_analyze(stack.gateway.url, b"nope", path=path, headers={"x-request-id": "client-id-123"})
    assert response.headers["x-request-id"] == "client-id-123"
    assert response.json()["error"]["request_id"] == "client-id-123"
