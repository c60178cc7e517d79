"""Schema migrations of the gateway database (Alembic), and :func:`upgrade`, which every opener runs.

The schema's source of truth is ``versions/``: one revision per change, oldest first; ``0001`` is the
schema as it was before migrations existed (tables made from the metadata). ``services.gateway.db``'s
tables must describe the schema at head: ``tests/services/gateway/test_migrations.py`` compares the two
with Alembic's autogenerate on SQLite and PostgreSQL and prints any difference.

Every process that opens the database (each gateway worker through ``make_engine``, ``snap2caption
keys``, ``data feedback-export``, ``db upgrade``) upgrades it to head first, so new code brings its
schema along. Several processes starting at once are safe: the upgrade runs in one transaction that
first takes a database-wide lock (PostgreSQL: an advisory transaction lock; SQLite: ``BEGIN
IMMEDIATE``, its write lock), so one process migrates while the others wait, then find the schema at
head and do nothing. The upgrade commits or rolls back as a whole (transactional DDL: PostgreSQL's
own; SQLite's is switched on for the migration connection). A database at head costs one read of the
version table and no lock. ``snap2caption db current|upgrade|downgrade`` shows or moves the revision
explicitly (downgrade before running an older release).

- A database made before migrations existed (the tables, no version table) is stamped ``0001``, then
  upgraded like any other: its rows are migrated, none is lost.
- A database migrated by newer code (a revision this code does not know) is refused with
  :class:`SchemaError`, never used with a schema the code does not expect.
- The version table is ``gateway_alembic_version``, not Alembic's default, so the gateway can share a
  PostgreSQL database with MLflow, which runs Alembic migrations of its own.

Adding a change: edit the tables in ``db.py``, add ``versions/rev_<next id>_<what>.py`` (copy the
newest one's header; ``down_revision`` is the current head), make it move the data, and run the
migration tests: they fail, listing the differences, until metadata and revisions agree.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, event, inspect, text

logger = logging.getLogger(__name__)
# Alembic logs its plugin set-up and context at INFO on every open; this module logs what it changes.
logging.getLogger("alembic").setLevel(logging.WARNING)

VERSION_TABLE = "gateway_alembic_version"
BASELINE = "0001"
# The tables revision 0001 made: a database with these and no version table predates migrations.
BASELINE_TABLES = frozenset({"api_keys", "inference_log", "feedback"})
# pg_advisory_xact_lock key: any constant the gateway alone uses ("S2CG").
_PG_LOCK_KEY = 0x53324347
# How long a SQLite opener waits for another process's migration (copying a large log takes a while).
_SQLITE_LOCK_WAIT_MS = 300_000


class SchemaError(RuntimeError):
    """The database's schema is not one this code can upgrade (newer, or tables of unknown origin)."""


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code (no ``alembic.ini``), migrating over ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).resolve().parent))
    config.attributes["connection"] = connection
    return config


@functools.cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this code knows."""
    head = _script().get_current_head()
    assert head is not None, "the gateway migrations have no revision"
    return head


def current_revision(connection: Connection) -> str | None:
    """The database's revision, or ``None`` when it has never been migrated (new, or older than 0001)."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` (the newest by default), safely when several processes open
    it at once.

    Raises:
        SchemaError: The database is at a revision this code does not know (migrated by newer code),
            or has some gateway tables but not the others and no version table.
    """
    target = head_revision() if revision == "head" else revision
    with engine.connect() as conn:
        if current_revision(conn) == target:
            return
    with _migrating(engine) as conn:
        # Read again under the lock: another process may have migrated while this one waited.
        current = current_revision(conn) or _stamp_if_unversioned(conn)
        if current == target:
            return
        logger.info("gateway database: upgrading schema %s -> %s", current or "(empty)", target)
        command.upgrade(alembic_config(conn), target)


def downgrade(engine: Engine, revision: str) -> None:
    """Downgrade the database to ``revision`` (``base``: no tables), e.g. before running an older release.

    Raises:
        SchemaError: As for :func:`upgrade`.
    """
    with _migrating(engine) as conn:
        logger.info("gateway database: downgrading schema %s -> %s", current_revision(conn), revision)
        command.downgrade(alembic_config(conn), revision)


@contextmanager
def _migrating(engine: Engine) -> Iterator[Connection]:
    """A connection whose transaction holds the migration lock, at a revision this code knows.

    Everything done through it commits as one (after a foreign key check on SQLite) or rolls back.
    """
    with engine.connect() as conn, _locked_transaction(conn):
        current = current_revision(conn)
        if current is not None:
            try:
                _script().get_revision(current)
            except CommandError:
                raise SchemaError(
                    f"the gateway database {engine.url!r} is at schema revision {current!r}, which this "
                    f"version of snap2caption does not know (its newest is {head_revision()!r}): it was "
                    "migrated by a newer version; run that version, or point this one at another database"
                ) from None
        yield conn
        if conn.dialect.name == "sqlite":
            _check_sqlite_foreign_keys(conn)


def _stamp_if_unversioned(conn: Connection) -> str | None:
    """Stamp a database made before migrations existed as ``0001``; ``None`` for an empty one."""
    found = BASELINE_TABLES & set(inspect(conn).get_table_names())
    if not found:
        return None
    if found != BASELINE_TABLES:
        raise SchemaError(
            f"the gateway database has tables {sorted(found)} but not {sorted(BASELINE_TABLES - found)} "
            f"and no {VERSION_TABLE} table: it was not made by snap2caption; point the gateway at "
            "another database"
        )
    logger.info("gateway database: made before migrations; stamping it as revision %s", BASELINE)
    command.stamp(alembic_config(conn), BASELINE)
    return BASELINE


@contextmanager
def _locked_transaction(conn: Connection) -> Iterator[None]:
    """One transaction holding the database's migration lock until it commits or rolls back."""
    if conn.dialect.name != "sqlite":
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            yield
        return
    with _sqlite_transactional_ddl(conn), conn.begin():
        yield


@contextmanager
def _sqlite_transactional_ddl(conn: Connection) -> Iterator[None]:
    """Make ``conn.begin()`` open ``BEGIN IMMEDIATE``, so DDL is transactional and migrators queue.

    Python's sqlite3 driver begins transactions only before INSERT/UPDATE/DELETE, so by default each
    CREATE/DROP/ALTER would commit on its own and a failed migration would leave half a schema.
    Foreign keys are off meanwhile: batch operations copy a table and drop the original while others
    still refer to it; :func:`_check_sqlite_foreign_keys` checks the result before the commit.
    """
    driver: Any = conn.connection.driver_connection
    # The connection's own settings (make_engine's pragmas), restored for its next user. Pragmas must
    # be set outside a transaction.
    foreign_keys = conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one()
    busy_timeout = conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one()
    conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
    conn.exec_driver_sql(f"PRAGMA busy_timeout={_SQLITE_LOCK_WAIT_MS}")
    conn.commit()
    saved_isolation = driver.isolation_level
    driver.isolation_level = None  # the driver's implicit transactions off: ours below instead

    def begin_immediate(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(conn, "begin", begin_immediate)
    try:
        yield
    finally:
        event.remove(conn, "begin", begin_immediate)
        driver.isolation_level = saved_isolation
        conn.exec_driver_sql(f"PRAGMA foreign_keys={int(foreign_keys)}")
        conn.exec_driver_sql(f"PRAGMA busy_timeout={int(busy_timeout)}")
        conn.commit()


def _check_sqlite_foreign_keys(conn: Connection) -> None:
    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
    if broken:
        raise SchemaError(f"the migration left {len(broken)} rows with broken foreign keys, e.g. {broken[0]}")
