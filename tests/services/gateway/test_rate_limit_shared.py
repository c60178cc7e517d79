"""Rate limits kept in the gateway database, shared by every gateway process: the token bucket's decisions
on SQLite and on a real PostgreSQL, exactly ``burst`` allowed under concurrent threads, full buckets swept,
a database failure letting requests through, and two real gateway processes on one database allowing
exactly the limit between them.

Refill cannot make any count here flaky: the concurrent tests use 0.001 requests/s (one token back every
1,000 s), the others a clock the test moves by hand.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine, func, select, text

from services.gateway.auth import KeyStore, RateLimiter
from services.gateway.db import make_engine, rate_limits
from tests.gateway_stack import assert_envelope, post_analyze
from tests.helpers import image_bytes
from tests.services.gateway.fake_backend import Fakes, fakes, healthy  # noqa: F401 (fixtures)

NO_REFILL = 0.001  # requests/s: one token back every 1,000 s, far longer than any test


class FakeClock:
    """Unix time the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh gateway database: a SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gateway.db'}"
    create: Callable[[], str] = request.getfixturevalue("new_postgres_database")
    return create()


@pytest.fixture()
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(rate_limits)).scalar_one())


def test_a_burst_then_the_rate(engine: Engine) -> None:
    clock = FakeClock()
    limiter = RateLimiter(engine, rate_per_s=2.0, burst=3, clock=clock)
    assert [limiter.acquire("k") for _ in range(3)] == [None, None, None]
    assert limiter.acquire("k") == pytest.approx(0.5)
    clock.advance(0.25)
    assert limiter.acquire("k") == pytest.approx(0.25)  # a refused request takes nothing
    clock.advance(0.25)
    assert limiter.acquire("k") is None
    assert limiter.acquire("k") == pytest.approx(0.5)
    assert limiter.acquire("other") is None  # every key has its own bucket
    clock.advance(100)
    assert [limiter.acquire("k") for _ in range(4)] == [None, None, None, pytest.approx(0.5)]  # never > burst
    # Another limiter on the same database (another process, in production) sees the same bucket.
    assert RateLimiter(engine, rate_per_s=2.0, burst=3, clock=clock).acquire("k") == pytest.approx(0.5)


def test_concurrent_callers_get_exactly_the_burst(engine: Engine) -> None:
    limiter = RateLimiter(engine, rate_per_s=NO_REFILL, burst=50)
    allowed: list[int] = []
    lock = threading.Lock()

    def hammer() -> None:
        mine = sum(1 for _ in range(40) if limiter.acquire("shared") is None)
        with lock:
            allowed.append(mine)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(allowed) == 50


def test_full_buckets_are_swept(engine: Engine) -> None:
    clock = FakeClock()
    limiter = RateLimiter(engine, rate_per_s=10.0, burst=5, clock=clock, sweep_interval_s=10)
    for i in range(30):
        limiter.acquire(f"client-{i}")
    assert rows(engine) == 30
    clock.advance(20)  # every bucket is full again (0.5 s would do), and a sweep is due
    assert limiter.acquire("late") is None
    assert rows(engine) == 1


def test_a_database_failure_lets_requests_through_and_is_counted(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RateLimiter(engine, rate_per_s=NO_REFILL, burst=1)
    assert limiter.acquire("k") is None
    assert limiter.acquire("k") is not None
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE rate_limits"))
    before = REGISTRY.get_sample_value("snap2caption_gateway_rate_limit_errors_total") or 0
    with caplog.at_level(logging.WARNING, logger="services.gateway.auth"):
        assert [limiter.acquire("k") for _ in range(3)] == [None, None, None]
    assert REGISTRY.get_sample_value("snap2caption_gateway_rate_limit_errors_total") == before + 3
    assert len([r for r in caplog.records if "rate limits unavailable" in r.message]) == 1  # not one per call


def test_nonsense_limits_are_refused(engine: Engine) -> None:
    with pytest.raises(ValueError):
        RateLimiter(engine, rate_per_s=0, burst=1)
    with pytest.raises(ValueError):
        RateLimiter(engine, rate_per_s=1, burst=0)


@pytest.mark.integration
def test_two_gateway_processes_on_one_database_allow_exactly_the_limit(
    healthy: Fakes,  # noqa: F811
    db_url: str,
) -> None:
    engine = make_engine(db_url)
    _, secret = KeyStore(engine).create("shared")
    engine.dispose()
    limit, sent = 15, 40
    settings = {
        "auth_enabled": "true",
        "database_url": db_url,
        "rate_limit_per_s": str(NO_REFILL),
        "rate_limit_burst": str(limit),
    }
    gateways = [healthy.gateway(**settings), healthy.gateway(**settings)]
    try:
        headers = {"content-type": "image/png", "authorization": f"Bearer {secret}"}

        def call(i: int) -> httpx.Response:  # alternately to each process, 8 at a time
            url = gateways[i % 2].url
            return post_analyze(url, image_bytes("red"), headers=headers, params={"features": "caption"})

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(call, range(sent)))
    finally:
        for gateway in gateways:
            gateway.stop(timeout_s=10)
    # Each process got 20 requests: counted per process, each would have allowed 15 (30 in all).
    assert Counter(r.status_code for r in responses) == {200: limit, 429: sent - limit}
    for refused in (r for r in responses if r.status_code == 429):
        assert_envelope(refused, 429, "rate_limited")
        assert int(refused.headers["retry-after"]) >= 1
