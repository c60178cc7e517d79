"""The gateway's backend clients without the stack: the circuit breaker, and a client's retries, timeouts
and error mapping against real loopback sockets that misbehave on cue."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from services.gateway.backends import BackendClient, BackendFailed, BreakerState, CircuitBreaker
from snap2caption.errors import UnsupportedFormat
from tests.services.gateway.loopback import OK_BODY, loopback_server, unit_settings

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


def _call(
    behaviours: list[str], name: str, calls: int = 1, **settings: Any
) -> tuple[list[Any], list[str], Any]:
    """Make ``calls`` calls through a fresh client; return their outcomes, connections used, breaker."""

    async def run() -> tuple[list[Any], list[str], Any]:
        async with loopback_server(behaviours) as (url, used):
            client = BackendClient(name, url, unit_settings(**settings))
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


def test_client_call_never_outlives_the_deadline_and_gives_no_verdict() -> None:
    async def run() -> tuple[list[Any], float, Any]:
        async with loopback_server(["hang"]) as (url, _):
            client = BackendClient("unit-deadline", url, unit_settings(backend_timeout_s=30))
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
        client = BackendClient("unit-refused", "http://127.0.0.1:9", unit_settings())
        try:
            return await client.post_image("/v1/x", b"img", "image/png", {}, deadline=time.monotonic() + 30)
        except BackendFailed as exc:
            return exc
        finally:
            await client.aclose()

    failure = asyncio.run(run())
    assert isinstance(failure, BackendFailed) and failure.code == "backend_unavailable"


# ------------------------------------------------------------------------------------------ readiness


def test_a_backend_that_stops_being_ready_serves_no_version_any_more() -> None:
    # A canary share goes only to a service whose last /readyz said it serves the release's version. A
    # process restarted on the same port (still loading, or gone) must not inherit what the last one said.
    ready = {"status": "ready", "checks": {"model": {"name": "captioner", "alias": "canary", "version": 2}}}

    async def run() -> list[frozenset[int]]:
        seen = []
        async with loopback_server([ready, "503", ready]) as (url, _):
            client = BackendClient("captioner", url, unit_settings())
            for _ in range(3):
                await client.poll_ready()
                seen.append(client.health.versions)
            client.forget_health()
            seen.append(client.health.versions)
            await client.aclose()
        return seen

    assert asyncio.run(run()) == [frozenset({2}), frozenset(), frozenset({2}), frozenset()]
