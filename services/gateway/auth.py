"""API keys and per-key rate limits for the gateway.

- :class:`KeyStore` creates, lists, revokes and verifies keys kept in the gateway database. A key is
  ``s2c_<id>_<random>``; only its SHA-256 is stored (the secret has 192 random bits, so a slow hash
  adds nothing but per-request cost). Lookups are cached for at most ``cache_ttl_s`` (1 s), so a
  revocation made by the CLI in another process takes effect within that time.
- :class:`RateLimiter` is a token bucket per key in the same database, shared by every gateway worker and
  process (one atomic statement per request), with full buckets swept.
- :class:`Auth` puts both together for a request: ``check(api_key, client) -> Principal``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Double, Engine, Table, bindparam, case, delete, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.expression import Executable

from services.gateway import metrics
from services.gateway.db import api_keys, rate_limits
from snap2caption.errors import Overloaded, RateLimited, Unauthorized

KEY_PREFIX = "s2c"
# s2c_<12 hex id>_<32 url-safe random chars>; anything else is refused without a database lookup.
_KEY_FORMAT = re.compile(r"^s2c_([0-9a-f]{12})_([A-Za-z0-9_-]{32})$")
_SHOWN_CHARS = 4  # random characters kept in `prefix`, enough to tell keys apart in a list

# Slack in the rate limiter's comparison for float sums at Unix-time magnitudes (an ulp of 1.7e9 s is
# 2.4e-7 s), so `burst` requests at one instant are all allowed however 1 / rate rounds.
_ROUNDING_S = 1e-6
# The dialects with an atomic upsert the rate limiter can use (the same API in both).
_UPSERTS: dict[str, Callable[[Table], Any]] = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiKey:
    """An API key as stored (never with its secret).

    Attributes:
        id: Stable key id (12 hex characters), the rate-limit and log identity.
        name: Who or what the key is for.
        prefix: First characters of the secret (``s2c_<id>_abcd``), to recognise it.
        created_at: When it was made (UTC).
        revoked_at: When it was revoked, or ``None`` while it is valid.
    """

    id: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class _Row:
    key: ApiKey
    digest: str


def _digest(secret: str) -> str:
    return "sha256$" + hashlib.sha256(secret.encode()).hexdigest()


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes even for timezone-aware columns.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class KeyStore:
    """API keys in the gateway database.

    Args:
        engine: From :func:`services.gateway.db.make_engine`.
        cache_ttl_s: How long a looked-up key row is trusted before it is read again; revocations made
            elsewhere take effect within this time.
        clock: Monotonic clock (tests inject one).
        max_cached: Most key rows cached; the oldest are dropped beyond it.
    """

    def __init__(
        self,
        engine: Engine,
        cache_ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_cached: int = 10_000,
    ) -> None:
        self.engine = engine
        self.cache_ttl_s = cache_ttl_s
        self._clock = clock
        self._max_cached = max_cached
        # key id -> (row or None when unknown, monotonic time it was read)
        self._cache: OrderedDict[str, tuple[_Row | None, float]] = OrderedDict()
        self._lock = threading.Lock()

    def create(self, name: str) -> tuple[ApiKey, str]:
        """Make a key. The secret is returned once and never stored.

        Args:
            name: Who or what the key is for (1..200 characters).

        Returns:
            ``(key, secret)``.
        """
        name = name.strip()
        if not 1 <= len(name) <= 200:
            raise ValueError("a key name must have 1 to 200 characters")
        key_id = secrets.token_hex(6)
        random_part = secrets.token_urlsafe(24)  # 24 bytes -> 32 characters, 192 bits
        secret = f"{KEY_PREFIX}_{key_id}_{random_part}"
        key = ApiKey(
            id=key_id,
            name=name,
            prefix=f"{KEY_PREFIX}_{key_id}_{random_part[:_SHOWN_CHARS]}",
            created_at=datetime.now(UTC),
        )
        with self.engine.begin() as conn:
            conn.execute(
                api_keys.insert().values(
                    id=key.id,
                    name=key.name,
                    prefix=key.prefix,
                    hash=_digest(secret),
                    created_at=key.created_at,
                )
            )
        return key, secret

    def list(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)).all()
        return [self._row(row).key for row in rows]

    def revoke(self, key_id: str) -> bool:
        """Revoke a key.

        Returns:
            Whether a valid key was revoked (``False`` for an unknown or already revoked one).
        """
        with self.engine.begin() as conn:
            result = conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
        with self._lock:
            self._cache.pop(key_id, None)
        return bool(result.rowcount)

    def verify(self, secret: str) -> ApiKey | None:
        """The valid key this secret belongs to, or ``None`` (malformed, unknown or revoked).

        The stored digest is compared in constant time.

        Raises:
            Overloaded: The database cannot be read (503: the caller may retry).
        """
        match = _KEY_FORMAT.match(secret)
        if match is None:
            return None
        row = self._lookup(match.group(1))
        # Compare even when the id is unknown, so timing says nothing about which ids exist.
        expected = row.digest if row is not None else _digest("")
        if not hmac.compare_digest(expected.encode(), _digest(secret).encode()):
            return None
        if row is None or row.key.revoked:
            return None
        return row.key

    def _lookup(self, key_id: str) -> _Row | None:
        now = self._clock()
        with self._lock:
            cached = self._cache.get(key_id)
            if cached is not None and now - cached[1] < self.cache_ttl_s:
                return cached[0]
        try:
            with self.engine.connect() as conn:
                found = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        except SQLAlchemyError as exc:
            raise Overloaded("API key store unavailable; retry shortly", retry_after=1.0) from exc
        row = self._row(found) if found is not None else None
        with self._lock:
            self._cache[key_id] = (row, now)
            self._cache.move_to_end(key_id)
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return row

    @staticmethod
    def _row(row: object) -> _Row:
        mapping = row._mapping  # type: ignore[attr-defined]
        key = ApiKey(
            id=mapping["id"],
            name=mapping["name"],
            prefix=mapping["prefix"],
            created_at=_utc(mapping["created_at"]) or datetime.now(UTC),
            revoked_at=_utc(mapping["revoked_at"]),
        )
        return _Row(key=key, digest=mapping["hash"])


class RateLimiter:
    """A token bucket per key, ``burst`` requests at once and ``rate_per_s`` sustained, kept in the gateway
    database so that every worker and process of a deployment draws from the same buckets.

    A bucket is stored as GCRA's "theoretical arrival time" ``tat`` (the leaky-bucket form of a token
    bucket): with ``T = 1 / rate_per_s``, a request at ``now`` is allowed when ``max(tat, now) + T <= now +
    burst * T``, and then moves ``tat`` to ``max(tat, now) + T``. Exactly a token bucket's decisions, with
    one number per key, so a request costs one atomic statement: an upsert whose update applies only when
    the request is allowed, returning the row only then (SQLite >= 3.35 and PostgreSQL both run it as one
    statement under the row's write lock; no read-modify-write race between processes). A refusal reads
    the row once more to say how long to wait.

    A bucket whose ``tat`` has passed is full, the same as no row: such rows are swept every
    ``sweep_interval_s``. Times are Unix seconds from ``clock``; gateways on several hosts need clocks in
    step to well under ``1 / rate_per_s`` (NTP is plenty).

    Args:
        engine: The gateway database (:func:`services.gateway.db.make_engine`).
        rate_per_s: Sustained requests per second per key.
        burst: Bucket size (requests allowed back to back).
        clock: Unix time in seconds (tests inject one).
        sweep_interval_s: How often this process deletes full buckets' rows.
    """

    def __init__(
        self,
        engine: Engine,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.time,
        sweep_interval_s: float = 60.0,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError(f"need rate_per_s > 0 and burst >= 1 (got {rate_per_s}, {burst})")
        self.engine = engine
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.sweep_interval_s = sweep_interval_s
        self._clock = clock
        self._interval = 1.0 / rate_per_s  # T: the time one token takes to come back
        self._last_sweep = clock()
        self._failing = False
        self._lock = threading.Lock()
        self._take = self._take_statement(engine.dialect.name)
        self._postgres = engine.dialect.name == "postgresql"

    def _take_statement(self, dialect: str) -> Executable:
        """The upsert that takes a token: inserts a new bucket, or updates one that allows the request;
        returns the row only then."""
        tat = rate_limits.c.tat
        now = bindparam("now", type_=Double)
        start = case((tat > now, tat), else_=now)  # max(tat, now), portable
        values = {"bucket": bindparam("bucket"), "tat": now + self._interval}
        update_tat = {"tat": start + self._interval}
        allowed = start + self._interval <= now + self.burst * self._interval + _ROUNDING_S
        if dialect not in _UPSERTS:
            raise ValueError(f"rate limits need SQLite or PostgreSQL, not {dialect}")
        statement: Executable = (
            _UPSERTS[dialect](rate_limits)
            .values(values)
            .on_conflict_do_update(index_elements=[rate_limits.c.bucket], set_=update_tat, where=allowed)
            .returning(tat)
        )
        return statement

    def acquire(self, key: str) -> float | None:
        """Take one token from ``key``'s bucket (blocking: call it from a worker thread).

        A database that cannot be reached lets the request through (logged once, counted in
        ``snap2caption_gateway_rate_limit_errors_total``): limits protect capacity, and the backends'
        own queues still shed load, whereas refusing everything would turn a database hiccup into an
        outage.

        Returns:
            ``None`` when allowed, else the seconds until a token is available.
        """
        now = self._clock()
        started = time.perf_counter()
        try:
            with self.engine.begin() as conn:
                if self._postgres:
                    # A bucket need not survive a crash (losing it lets a few requests through): skip
                    # the WAL flush that dominates the commit (p50 3.2 ms -> 0.8 ms measured here).
                    conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                if conn.execute(self._take, {"bucket": key, "now": now}).first() is not None:
                    wait = None
                else:
                    tat = conn.execute(select(rate_limits.c.tat).where(rate_limits.c.bucket == key)).scalar()
                    wait = max(0.0, (tat or now) + self._interval - now - self.burst * self._interval)
                if self._sweep_due(now):
                    conn.execute(delete(rate_limits).where(rate_limits.c.tat < now))
        except SQLAlchemyError as exc:
            metrics.RATE_LIMIT_ERRORS.inc()
            if not self._failing:  # the first of a run of failures, not every request
                logger.warning("rate limits unavailable, letting requests through: %s", exc)
            self._failing = True
            return None
        metrics.RATE_LIMIT_SECONDS.observe(time.perf_counter() - started)
        if self._failing:
            self._failing = False
            logger.info("rate limits available again")
        return wait

    def _sweep_due(self, now: float) -> bool:
        with self._lock:
            if now - self._last_sweep < self.sweep_interval_s:
                return False
            self._last_sweep = now
            return True


@dataclass(frozen=True)
class Principal:
    """Who a request is from: the API key id, or ``None`` when keys are not required."""

    key_id: str | None


class Auth:
    """Authenticate and rate-limit one request.

    Args:
        store: The key store; required when ``enabled``.
        limiter: Rate limiter, or ``None`` for no limit.
        enabled: Whether an API key is required.
    """

    def __init__(self, store: KeyStore | None, limiter: RateLimiter | None, enabled: bool) -> None:
        if enabled and store is None:
            raise ValueError("API keys are enabled but there is no key store")
        self.store = store
        self.limiter = limiter
        self.enabled = enabled

    def check(self, api_key: str | None, client: str) -> Principal:
        """Who the request is from, if it may proceed now.

        Args:
            api_key: The key the request carried, if any.
            client: The client address, the rate-limit identity when keys are off.

        Returns:
            The principal.

        Raises:
            Unauthorized: Keys are required and this one is missing, unknown or revoked.
            RateLimited: Over the rate limit (``retry_after`` says when to come back).
        """
        if self.enabled:
            assert self.store is not None
            if not api_key:
                raise Unauthorized("an API key is required")
            key = self.store.verify(api_key)
            if key is None:
                raise Unauthorized("unknown or revoked API key")
            principal = Principal(key_id=key.id)
            bucket = f"key:{key.id}"
        else:
            principal = Principal(key_id=None)
            bucket = f"client:{client}"
        if self.limiter is not None:
            wait = self.limiter.acquire(bucket)
            if wait is not None:
                raise RateLimited(f"rate limit exceeded; retry in {wait:.2f} s", retry_after=wait)
        return principal
