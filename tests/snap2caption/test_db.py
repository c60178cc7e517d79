"""The SQLite settings every database of the project gets, from the gateway's and the ETL's openers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from services.etl.jobs import JobStore
from services.gateway.db import make_engine
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
