"""The SQLite settings every database of the project gets, from the gateway's and the ETL's openers."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError

from services.etl.jobs import JobStore
from services.gateway.db import make_engine
from snap2caption import db
from snap2caption.db import use_sqlite_pragmas


def _plain(url: str) -> Engine:
    engine = create_engine(url)
    use_sqlite_pragmas(engine)
    return engine


OPENERS: dict[str, Callable[[str], Engine]] = {
    "use_sqlite_pragmas": _plain,
    "gateway": make_engine,
    "etl job store": lambda url: JobStore(url).engine,
}


@pytest.mark.parametrize("opener", OPENERS)
def test_every_connection_gets_the_pragmas(tmp_path: Path, opener: str) -> None:
    engine = OPENERS[opener](f"sqlite:///{tmp_path / 'state.db'}")
    try:
        with engine.connect() as conn:
            conn.invalidate()  # the next checkout opens a new DBAPI connection: the settings come with each
        with engine.connect() as conn:
            pragmas = {
                name: conn.execute(text(f"PRAGMA {name}")).scalar_one()
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            }
    finally:
        engine.dispose()
    # synchronous: 1 is NORMAL.
    assert pragmas == {"journal_mode": "wal", "synchronous": 1, "busy_timeout": 5000, "foreign_keys": 1}


@contextlib.contextmanager
def _locked_by_another(path: Path) -> Iterator[threading.Event]:
    """Another connection, without the project's settings, writing the new file ``path`` in rollback-journal
    mode: it holds the write lock until the yielded event is set (or the block ends), then commits."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        other = sqlite3.connect(path, isolation_level=None, timeout=60)  # its commit may wait, never fail
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("CREATE TABLE t (x)")
            held.set()
            release.wait(30)
            other.execute("COMMIT")
        finally:
            other.close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        yield release
    finally:
        release.set()
        holder.join(30)


def test_a_connection_waits_for_the_wal_switch_while_another_locks_the_file(tmp_path: Path) -> None:
    # Two gateway workers opening a new database at once: SQLite refuses the journal-mode switch at once
    # (no busy timeout) while the other holds a lock. The opener retries instead of failing its start.
    path = tmp_path / "state.db"
    with _locked_by_another(path) as release:
        engine = _plain(f"sqlite:///{path}")
        threading.Timer(0.3, release.set).start()  # the other connection commits while this one retries
        try:
            with engine.connect() as conn:
                assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
                assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 0
        finally:
            engine.dispose()


def test_a_lock_held_past_the_wait_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db, "WAL_SWITCH_WAIT_S", 0.2)
    path = tmp_path / "state.db"
    with _locked_by_another(path):
        engine = _plain(f"sqlite:///{path}")
        try:
            with pytest.raises(OperationalError, match="database is locked"):
                engine.connect()
        finally:
            engine.dispose()
