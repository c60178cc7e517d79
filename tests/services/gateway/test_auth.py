"""API keys (hashing, verify, revocation within the cache TTL) and ``Auth.check`` (the token bucket itself:
``test_rate_limit_shared.py``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import select, text

from services.gateway import auth as auth_module
from services.gateway.auth import Auth, KeyStore, Principal, RateLimiter
from services.gateway.db import api_keys, make_engine
from snap2caption.errors import Overloaded, RateLimited, Unauthorized


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'nested' / 'gateway.db'}"


def test_secret_is_never_stored_only_its_hash(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(db_url)
    key, secret = KeyStore(engine).create("alice's uploader")
    assert secret.startswith(f"s2c_{key.id}_")
    assert key.prefix == secret[: len(key.prefix)] and len(key.prefix) < len(secret)
    with engine.connect() as conn:
        stored = conn.execute(select(api_keys.c.hash)).scalar_one()
    assert stored == "sha256$" + hashlib.sha256(secret.encode()).hexdigest()
    engine.dispose()  # checkpoint the WAL into the file
    # By position, not by splitting on "_": the url-safe random part may itself contain "_" (split, it
    # could leave a 1-character "secret" that occurs in any file by chance).
    random_part = secret.removeprefix(f"s2c_{key.id}_").encode()
    assert len(random_part) == 32
    files = list((tmp_path / "nested").iterdir())
    assert files, "the database file was created in a new folder"
    for path in files:
        assert random_part not in path.read_bytes(), path


def test_verify_accepts_the_secret_and_refuses_everything_else(db_url: str) -> None:
    store = KeyStore(make_engine(db_url))
    key, secret = store.create("svc")
    other, _ = store.create("other")
    assert store.verify(secret) == key
    wrong_random = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for attempt in [
        wrong_random,
        secret.replace(key.id, other.id),  # right shape, another key's id
        secret + "x",
        "",
        "s2c_",
        "Bearer " + secret,
        f"s2c_{'0' * 12}_{'a' * 32}",  # well-formed, unknown id
    ]:
        assert store.verify(attempt) is None, attempt


def test_a_random_part_with_underscores_and_dashes_verifies(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The id has a fixed length, so a random part full of the separator still parses as the key's."""
    store = KeyStore(make_engine(db_url))
    monkeypatch.setattr(auth_module.secrets, "token_urlsafe", lambda n: "_-_" * 10 + "_a")  # 32 chars
    key, secret = store.create("underscores")
    assert secret == f"s2c_{key.id}_" + "_-_" * 10 + "_a"
    assert store.verify(secret) == key
    assert store.verify(secret[:-1] + "b") is None


def test_list_and_revoke(db_url: str) -> None:
    store = KeyStore(make_engine(db_url))
    first, secret = store.create("first")
    second, _ = store.create("second")
    assert [k.id for k in store.list()] == [first.id, second.id]
    assert store.revoke(first.id) is True
    assert store.revoke(first.id) is False  # already revoked
    assert store.revoke("nope") is False
    listed = {k.id: k for k in store.list()}
    assert listed[first.id].revoked and not listed[second.id].revoked
    assert store.verify(secret) is None  # this process revoked it: no cache delay


def test_revocation_elsewhere_takes_effect_within_the_cache_ttl(db_url: str) -> None:
    clock = FakeClock()
    gateway_store = KeyStore(make_engine(db_url), cache_ttl_s=1.0, clock=clock)
    cli_store = KeyStore(make_engine(db_url))  # another process, as far as the cache knows
    key, secret = gateway_store.create("svc")
    assert gateway_store.verify(secret) == key
    assert cli_store.revoke(key.id)
    clock.advance(0.5)
    assert gateway_store.verify(secret) == key  # still cached
    clock.advance(0.5)
    assert gateway_store.verify(secret) is None  # 1 s later the revocation is seen


def test_key_names_are_checked(db_url: str) -> None:
    store = KeyStore(make_engine(db_url))
    with pytest.raises(ValueError):
        store.create("   ")
    with pytest.raises(ValueError):
        store.create("x" * 201)


# --- Auth.check ---------------------------------------------------------------------------------------


def test_auth_enabled_requires_a_valid_key_and_limits_per_key(db_url: str) -> None:
    engine = make_engine(db_url)
    store = KeyStore(engine)
    key, secret = store.create("svc")
    other, other_secret = store.create("other")
    clock = FakeClock()
    auth = Auth(store, RateLimiter(engine, rate_per_s=1.0, burst=2, clock=clock), enabled=True)
    with pytest.raises(Unauthorized):
        auth.check(None, "10.0.0.1")
    with pytest.raises(Unauthorized):
        auth.check("s2c_garbage", "10.0.0.1")
    assert auth.check(secret, "10.0.0.1") == Principal(key_id=key.id)
    assert auth.check(secret, "10.0.0.2") == Principal(key_id=key.id)  # the key is limited, not the address
    with pytest.raises(RateLimited) as refused:
        auth.check(secret, "10.0.0.3")
    assert refused.value.retry_after == pytest.approx(1.0)
    assert refused.value.status == 429
    assert auth.check(other_secret, "10.0.0.1") == Principal(key_id=other.id)
    store.revoke(key.id)
    clock.advance(5)
    with pytest.raises(Unauthorized):
        auth.check(secret, "10.0.0.1")


def test_auth_disabled_limits_by_client_address(db_url: str) -> None:
    auth = Auth(
        None, RateLimiter(make_engine(db_url), rate_per_s=1.0, burst=1, clock=FakeClock()), enabled=False
    )
    assert auth.check(None, "10.0.0.1") == Principal(key_id=None)
    with pytest.raises(RateLimited):
        auth.check("anything", "10.0.0.1")
    assert auth.check(None, "10.0.0.2") == Principal(key_id=None)
    assert Auth(None, None, enabled=False).check(None, "x") == Principal(key_id=None)


def test_auth_enabled_without_a_store_is_a_configuration_error() -> None:
    with pytest.raises(ValueError):
        Auth(None, None, enabled=True)


def test_an_unreadable_key_store_is_a_503_not_a_crash(db_url: str) -> None:
    engine = make_engine(db_url)
    store = KeyStore(engine)
    _, secret = store.create("svc")
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE api_keys"))
    with pytest.raises(Overloaded) as refused:
        Auth(store, None, enabled=True).check(secret, "10.0.0.1")
    assert refused.value.status == 503 and refused.value.retry_after == 1.0
