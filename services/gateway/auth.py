"""API keys and per-key rate limits for the gateway.

- :class:`KeyStore` creates, lists, revokes and verifies keys kept in the gateway database. A key is
  ``s2c_<id>_<random>``; only its SHA-256 is stored (the secret has 192 random bits, so a slow hash
  adds nothing but per-request cost). Lookups are cached for at most ``cache_ttl_s`` (1 s), so a
  revocation made by the CLI in another process takes effect within that time.
- :class:`RateLimiter` is a token bucket per key, thread-safe, with idle buckets evicted.
- :class:`Auth` puts both together for a request: ``check(api_key, client) -> Principal``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import SQLAlchemyError

from services.gateway.db import api_keys
from snap2caption.errors import Overloaded, RateLimited, Unauthorized

KEY_PREFIX = "s2c"
# s2c_<12 hex id>_<32 url-safe random chars>; anything else is refused without a database lookup.
_KEY_FORMAT = re.compile(r"^s2c_([0-9a-f]{12})_([A-Za-z0-9_-]{32})$")
_SHOWN_CHARS = 4  # random characters kept in `prefix`, enough to tell keys apart in a list


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
    """A token bucket per key: ``burst`` requests at once, refilled at ``rate_per_s``.

    Memory stays bounded: a bucket idle long enough to be full again is the same as no bucket, so it
    is dropped; beyond ``max_keys`` live buckets the least recently used go first.

    Args:
        rate_per_s: Sustained requests per second per key.
        burst: Bucket size (requests allowed back to back).
        clock: Monotonic clock (tests inject one).
        max_keys: Most buckets kept.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if rate_per_s <= 0 or burst < 1 or max_keys < 1:
            raise ValueError(f"need rate_per_s > 0, burst >= 1, max_keys >= 1 (got {rate_per_s}, {burst})")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._refill_s = burst / rate_per_s  # an idle bucket is full again after this
        # key -> [tokens, last update]; ordered from least to most recently used
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float | None:
        """Take one token from ``key``'s bucket.

        Returns:
            ``None`` when allowed, else the seconds until a token is available.
        """
        with self._lock:
            now = self._clock()
            self._evict_idle(now)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = [float(self.burst), now]
                self._buckets[key] = bucket
                if len(self._buckets) > self.max_keys:
                    self._buckets.popitem(last=False)
            else:
                bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate_per_s)
                bucket[1] = now
                self._buckets.move_to_end(key)
            if bucket[0] >= 1.0:
                bucket[0] -= 1.0
                return None
            return (1.0 - bucket[0]) / self.rate_per_s

    def __len__(self) -> int:
        """Buckets held now."""
        with self._lock:
            return len(self._buckets)

    def _evict_idle(self, now: float) -> None:
        while self._buckets:
            _key, (_tokens, last) = next(iter(self._buckets.items()))
            if now - last < self._refill_s:
                break
            self._buckets.popitem(last=False)


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
