"""What every SQL database of the project needs from SQLAlchemy, whichever service opens it.

The gateway (API keys, inference log, feedback) and the ETL service (its job store) both keep their
state in SQLite by default and in Postgres at scale; the SQLite connection settings live here once.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from sqlalchemy import Engine, event

BUSY_TIMEOUT_MS = 5000
# How long a new connection keeps trying to switch the file to WAL while another connection locks it.
WAL_SWITCH_WAIT_S = 30.0


def use_sqlite_pragmas(engine: Engine) -> None:
    """Set the project's SQLite pragmas on every new connection of ``engine``; a no-op on other databases.

    WAL: readers (key checks, feedback, job status polls) never wait for a writer, and a killed process
    loses nothing committed. ``synchronous=NORMAL`` is durable enough under WAL. ``busy_timeout``:
    several processes writing at once (the CLI, gateway workers, the ETL runner) wait briefly instead
    of failing with "database is locked". ``foreign_keys``: SQLite enforces declared keys only when asked.

    Switching to WAL needs the file to itself, and SQLite answers "database is locked" at once, without
    the busy timeout, while another connection holds a lock on a file not yet in WAL mode: two gateway
    workers opening a new database in the same instant (one switching it, or migrating it), or a tool
    that opened it without these settings. Each connection retries the switch for up to
    ``WAL_SWITCH_WAIT_S`` before it gives up.

    Args:
        engine: A freshly created engine, before its first connection.
    """
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _set_sqlite_pragmas)


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS:d}")
    _switch_to_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode=WAL``, tried again every 50 ms for up to ``WAL_SWITCH_WAIT_S`` while the file
    is locked."""
    deadline = time.monotonic() + WAL_SWITCH_WAIT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.05)
