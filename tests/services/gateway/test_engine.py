"""The gateway engine's parts without the stack: circuit breaker, backend client (retries, timeouts, error
mapping) against real loopback sockets, image normalisation, option parsing, box scaling."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from PIL import Image

from services.gateway.config import Settings
from services.gateway.engine import AnalyzeOptions as EngineOptions
from services.gateway.engine import (
    BackendClient,
    BackendFailed,
    BreakerState,
    CircuitBreaker,
    Gateway,
    NormalisedImage,
    _objects,
    normalise_image,
    within_deadline,
)
from services.gateway.routes import parse_features, resolve_options
from services.gateway.schemas import AnalyzeOptions as OptionsBody
from snap2caption.errors import (
    BadRequest,
    CorruptImage,
    ImageTooLarge,
    Overloaded,
    PayloadTooLarge,
    Timeout,
    UnsupportedFormat,
)
from snap2caption.imaging import DecodeLimits

# ------------------------------------------------------------------------------------------ breaker


class FakeClock:
    """A settable monotonic clock (time is an input of the breaker, not something to wait for)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_and_half_opens_after_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("unit-a", failure_threshold=3, cooldown_s=5.0, clock=clock)
    assert breaker.state is BreakerState.CLOSED
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED  # two failures: still closed
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_after_s == pytest.approx(5.0)
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # the one trial call
    assert not breaker.allow()  # nobody else while it runs
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow() and breaker.allow()


def test_breaker_failed_trial_reopens_for_a_full_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("unit-b", failure_threshold=1, cooldown_s=2.0, clock=clock)
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now += 2.0
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after_s == pytest.approx(2.0)


def test_breaker_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker("unit-c", failure_threshold=2, cooldown_s=1.0, clock=FakeClock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_breaker_released_trial_lets_the_next_call_try() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("unit-d", failure_threshold=1, cooldown_s=1.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.0
    assert breaker.allow()
    breaker.release()  # the trial was cancelled: no verdict
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()


def test_breaker_refuses_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("unit-e", failure_threshold=0, cooldown_s=1.0)


# ------------------------------------------------------------------------------------------ backend client

Behaviour = Callable[[asyncio.StreamWriter], Any]


def _response(status: int, body: dict[str, Any], extra_headers: str = "") -> bytes:
    data = json.dumps(body).encode()
    head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
    return (head + extra_headers + "\r\n").encode() + data


OK_BODY = {"model": {"name": "m", "version": 1, "alias": "production", "backend": "torch"}, "results": []}


@asynccontextmanager
async def loopback_server(behaviours: list[str]) -> AsyncIterator[tuple[str, list[str]]]:
    """A real TCP server on loopback; connection ``i`` behaves as ``behaviours[i]`` (the last repeats):

    ``close`` reads the request and hangs up without answering; ``ok`` answers 200 JSON; ``hang`` never
    answers; ``500`` answers ``internal_error``; ``503`` answers ``overloaded`` with Retry-After 3;
    ``415`` answers ``unsupported_format``.
    Yields the base URL and the log of behaviours used, one per connection.
    """
    used: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        behaviour = behaviours[min(len(used), len(behaviours) - 1)]
        used.append(behaviour)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        await reader.readexactly(length)
        if behaviour == "ok":
            writer.write(_response(200, OK_BODY))
        elif behaviour == "hang":
            await asyncio.sleep(30)
        elif behaviour == "500":
            writer.write(_response(500, {"error": {"code": "internal_error", "message": "broken"}}))
        elif behaviour == "503":
            busy = {"error": {"code": "overloaded", "message": "busy"}}
            writer.write(_response(503, busy, "retry-after: 3\r\n"))
        elif behaviour == "415":
            writer.write(_response(415, {"error": {"code": "unsupported_format", "message": "not an image"}}))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", used
    finally:
        server.close()


def _settings(**overrides: Any) -> Settings:
    # Generous timeouts: a loopback answer can take a second when other processes load the cores, and
    # only the tests of timeouts (against a server that never answers) should ever see one fire.
    values: dict[str, Any] = {
        "backend_timeout_s": 10.0,
        "connect_timeout_s": 10.0,
        "retry_jitter_s": 0.01,
        "breaker_failure_threshold": 2,
        "breaker_cooldown_s": 60,
        "database_url": "sqlite://",
        **overrides,
    }
    return Settings(**values)


def _call(
    behaviours: list[str], name: str, calls: int = 1, **settings: Any
) -> tuple[list[Any], list[str], Any]:
    """Make ``calls`` calls through a fresh client; return their outcomes, connections used, breaker."""

    async def run() -> tuple[list[Any], list[str], Any]:
        async with loopback_server(behaviours) as (url, used):
            client = BackendClient(name, url, _settings(**settings))
            outcomes: list[Any] = []
            for _ in range(calls):
                try:
                    deadline = time.monotonic() + 30  # far: the client's own timeout decides
                    outcomes.append(
                        await client.post_image("/v1/x", b"img", "image/png", {}, deadline=deadline)
                    )
                except Exception as exc:
                    outcomes.append(exc)
            await client.aclose()
            return outcomes, used, client.breaker

    return asyncio.run(run())


def test_client_ok() -> None:
    (answer,), used, breaker = _call(["ok"], "unit-ok")
    assert answer.body == OK_BODY and answer.seconds > 0
    assert used == ["ok"] and breaker.state is BreakerState.CLOSED


def test_client_retries_once_when_the_connection_drops_before_an_answer() -> None:
    (answer,), used, breaker = _call(["close", "ok"], "unit-retry")
    assert answer.body == OK_BODY
    assert used == ["close", "ok"]
    assert breaker.state is BreakerState.CLOSED


def test_client_gives_up_after_one_retry() -> None:
    (failure,), used, _ = _call(["close"], "unit-noretry")
    assert isinstance(failure, BackendFailed) and failure.code == "backend_unavailable"
    assert used == ["close", "close"]


def test_client_never_retries_a_timeout_and_counts_it_against_the_breaker() -> None:
    outcomes, used, breaker = _call(["hang"], "unit-timeout", calls=3, backend_timeout_s=0.5)
    assert [o.code for o in outcomes] == ["timeout", "timeout", "circuit_open"]
    assert used == ["hang", "hang"]  # one connection per call, none for the refused third
    assert breaker.state is BreakerState.OPEN


def test_client_5xx_fails_with_the_backends_code_and_opens_the_breaker() -> None:
    outcomes, used, breaker = _call(["500"], "unit-500", calls=3)
    assert [o.code for o in outcomes] == ["internal_error", "internal_error", "circuit_open"]
    assert "broken" in outcomes[0].message
    assert used == ["500", "500"]
    assert breaker.state is BreakerState.OPEN


def test_client_overloaded_is_backpressure_and_never_opens_the_breaker() -> None:
    outcomes, used, breaker = _call(["503"], "unit-503", calls=6)  # three times the threshold
    assert [o.code for o in outcomes] == ["overloaded"] * 6
    assert all(o.retry_after == 3.0 and "busy" in o.message for o in outcomes)
    assert len(used) == 6
    assert breaker.state is BreakerState.CLOSED


def test_within_deadline_stops_the_block_at_the_deadline_with_a_504() -> None:
    async def run(block_s: float, inner: BaseException | None = None) -> None:
        async with within_deadline(time.monotonic() + 0.2, "doing the thing"):
            await asyncio.sleep(block_s)
            if inner is not None:
                raise inner

    with pytest.raises(Timeout, match="ran out while doing the thing") as cut:
        asyncio.run(run(30))
    assert cut.value.status == 504
    asyncio.run(run(0))  # in time: nothing happens
    with pytest.raises(
        TimeoutError, match="its own"
    ):  # a TimeoutError of the block's own is not the deadline
        asyncio.run(run(0, TimeoutError("its own")))


def test_client_call_never_outlives_the_deadline_and_gives_no_verdict() -> None:
    async def run() -> tuple[list[Any], float, Any]:
        async with loopback_server(["hang"]) as (url, _):
            client = BackendClient("unit-deadline", url, _settings(backend_timeout_s=30))
            started = time.monotonic()
            outcomes: list[Any] = []
            for _ in range(3):  # past the threshold of 2
                try:
                    await client.post_image("/v1/x", b"img", "image/png", {}, deadline=time.monotonic() + 0.2)
                except BackendFailed as exc:
                    outcomes.append(exc)
            try:  # a deadline already passed: no call at all
                await client.post_image("/v1/x", b"img", "image/png", {}, deadline=time.monotonic())
            except BackendFailed as exc:
                outcomes.append(exc)
            await client.aclose()
            return outcomes, time.monotonic() - started, client.breaker

    outcomes, elapsed, breaker = asyncio.run(run())
    assert [(o.code, o.by_deadline) for o in outcomes] == [("timeout", True)] * 4
    assert elapsed < 15  # three 0.2 s budgets, not three 30 s backend timeouts
    assert breaker.state is BreakerState.CLOSED


def test_client_passes_a_backends_image_refusal_on_and_keeps_the_breaker_closed() -> None:
    outcomes, _, breaker = _call(["415"], "unit-415", calls=3)
    assert all(isinstance(o, UnsupportedFormat) and o.message == "not an image" for o in outcomes)
    assert breaker.state is BreakerState.CLOSED


def test_client_connection_refused_is_backend_unavailable() -> None:
    async def run() -> Any:
        client = BackendClient("unit-refused", "http://127.0.0.1:9", _settings())
        try:
            return await client.post_image("/v1/x", b"img", "image/png", {}, deadline=time.monotonic() + 30)
        except BackendFailed as exc:
            return exc
        finally:
            await client.aclose()

    failure = asyncio.run(run())
    assert isinstance(failure, BackendFailed) and failure.code == "backend_unavailable"


# ------------------------------------------------------------------------------------------ normalisation

LIMITS = DecodeLimits(max_bytes=1_000_000, max_pixels=1_000_000)


def _encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_normalise_shrinks_and_reencodes_keeping_the_original_size() -> None:
    data = _encode(Image.new("RGB", (800, 400), (200, 10, 10)), "PNG")
    image = normalise_image(data, LIMITS, max_side=200, encoding="jpeg")
    assert (image.width, image.height) == (800, 400)
    assert (image.sent_width, image.sent_height) == (200, 100)
    assert image.format == "png" and image.content_type == "image/jpeg"
    sent = Image.open(io.BytesIO(image.data))
    assert sent.format == "JPEG" and sent.size == (200, 100)
    assert image.n_bytes == len(data) and len(image.sha256) == 64


def test_normalise_applies_exif_orientation_and_drops_it_from_the_copy() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 60 x 40 displays as 40 x 60
    data = _encode(Image.new("RGB", (60, 40), (0, 0, 200)), "JPEG", exif=exif.tobytes())
    image = normalise_image(data, LIMITS, max_side=1000, encoding="png")
    assert (image.width, image.height) == (40, 60)
    sent = Image.open(io.BytesIO(image.data))
    assert sent.size == (40, 60) and sent.getexif().get(0x0112) is None


def test_normalise_png_is_lossless() -> None:
    original = Image.new("RGB", (5, 3))
    original.putdata([(i * 10, 255 - i * 10, i) for i in range(15)])
    image = normalise_image(_encode(original, "PNG"), LIMITS, max_side=100, encoding="png")
    assert list(Image.open(io.BytesIO(image.data)).convert("RGB").getdata()) == list(original.getdata())


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"hello, world", UnsupportedFormat),
        (b"%PDF-1.7\n...", UnsupportedFormat),
        (_encode(Image.new("RGB", (50, 50)), "PNG")[:60], CorruptImage),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 2_000_000, PayloadTooLarge),
        (_encode(Image.new("L", (2000, 1000)), "PNG"), ImageTooLarge),
    ],
)
def test_normalise_refuses_what_the_decoder_refuses(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        normalise_image(data, LIMITS, max_side=100, encoding="jpeg")


def test_boxes_are_scaled_to_the_original_frame_and_clamped() -> None:
    image = NormalisedImage(
        data=b"", content_type="image/jpeg", width=1000, height=500, sent_width=200, sent_height=100,
        format="png", n_bytes=0, sha256="", original=b"",
    )  # fmt: skip
    body = {
        "results": [
            {
                "image": {"width": 200, "height": 100},
                "objects": [
                    {"label": "a", "score": 0.9, "box": {"x1": 10, "y1": 20, "x2": 50, "y2": 60}},
                    {"label": "b", "score": 0.5, "box": {"x1": -1, "y1": 0, "x2": 201, "y2": 100.5}},
                ],
            }
        ]
    }
    a, b = _objects(body, image)
    assert (a.box.x1, a.box.y1, a.box.x2, a.box.y2) == (50, 100, 250, 300)
    assert (b.box.x1, b.box.y1, b.box.x2, b.box.y2) == (0, 0, 1000, 500)


# ------------------------------------------------------------------------------------------ options


def test_parse_features() -> None:
    assert parse_features(None) == {"caption", "alt_text", "tags", "objects"}
    assert parse_features("caption, TAGS") == {"caption", "tags"}
    assert parse_features(["objects"]) == {"objects"}
    with pytest.raises(BadRequest, match="unknown feature"):
        parse_features("caption,faces")
    with pytest.raises(BadRequest, match="empty"):
        parse_features(" , ")


def test_json_options_override_query_options() -> None:
    settings = _settings(default_max_tags=7)
    query = OptionsBody(features="caption", max_tags=3, gender_neutral=True)
    body = OptionsBody(features=["tags"], min_confidence=0.4)
    options = resolve_options(settings, query, body)
    assert options.features == {"tags"}
    assert options.max_tags == 3 and options.min_confidence == 0.4 and options.gender_neutral
    defaults = resolve_options(settings, OptionsBody(), None)
    assert defaults.max_tags == 7 and not defaults.gender_neutral and defaults.min_confidence is None


def test_settings_production_profile_turns_auth_on_and_origins_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAP2CAPTION_GATEWAY_PROFILE", "production")
    monkeypatch.setenv("SNAP2CAPTION_GATEWAY_CORS_ALLOW_ORIGINS", "https://a.example, https://b.example")
    settings = Settings()
    assert settings.auth_enabled and settings.port == 8000
    assert settings.cors_allow_origins == ["https://a.example", "https://b.example"]
    monkeypatch.setenv("SNAP2CAPTION_GATEWAY_CORS_ALLOW_ORIGINS", "*")
    with pytest.raises(ValueError, match="list origins"):
        Settings()
    monkeypatch.delenv("SNAP2CAPTION_GATEWAY_CORS_ALLOW_ORIGINS")
    monkeypatch.delenv("SNAP2CAPTION_GATEWAY_PROFILE")
    assert not Settings().auth_enabled


def test_unreadable_backend_answers_are_backend_failures_not_500s() -> None:
    image = normalise_image(_encode(Image.new("RGB", (8, 8)), "PNG"), LIMITS, max_side=64, encoding="png")

    async def run() -> Exception:
        # Both backends answer 200, but without results: unreadable, so nothing is computable (503).
        async with loopback_server(["ok"]) as (url, _):
            gateway = Gateway(_settings(captioner_url=url, detector_url=url))
            try:
                options = EngineOptions(features=frozenset({"caption", "tags"}))
                await gateway.analyze(image, options, 0.0, deadline=time.monotonic() + 30)
            except Exception as exc:
                return exc
            finally:
                await gateway.close()
        raise AssertionError("analyze should have failed")

    error = asyncio.run(run())
    assert isinstance(error, Overloaded), error
    assert "unreadable answer from the caption backend" in error.message
    assert "unreadable answer from the tags backend" in error.message
