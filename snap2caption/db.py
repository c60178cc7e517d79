"""What every SQL database of the project needs from SQLAlchemy, whichever service opens it.

The gateway (API keys, inference log, feedback) and the ETL service (its job store) both keep their
state in SQLite by default and in Postgres at scale; the SQLite connection settings live here once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event


def use_sqlite_pragmas(engine: Engine) -> None:
    """Set the project's SQLite pragmas on every new connection of ``engine``; a no-op on other databases.

    WAL: readers (key checks, feedback, job status polls) never wait for a writer, and a killed process
    loses nothing committed. ``synchronous=NORMAL`` is durable enough under WAL. ``busy_timeout``:
    several processes writing at once (the CLI, gateway workers, the ETL runner) wait briefly instead
    of failing with "database is locked". ``foreign_keys``: SQLite enforces declared keys only when asked.

    Args:
        engine: A freshly created engine, before its first connection.
    """
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _set_sqlite_pragmas)


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
