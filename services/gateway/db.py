"""The gateway's database: API keys, the inference log and feedback (SQLAlchemy Core, SQLite or Postgres).

SQLite is the embedded default (``$SNAP2CAPTION_HOME/gateway.db``); a Postgres URL
(``postgresql+psycopg://user:pw@host/db``) runs the same code when one machine is not enough.
The schema is created when missing, so the gateway, its workers and the ``snap2caption keys`` CLI can
each open the database first.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

logger = logging.getLogger(__name__)

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    # The key's first characters (``s2c_<id>_abcd``) so an operator can recognise one in a list.
    Column("prefix", String(64), nullable=False),
    # ``sha256$<hex digest>`` of the secret (192 random bits, so no slow hash is needed); never the secret.
    Column("hash", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

inference_log = Table(
    "inference_log",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("key_id", String(32), nullable=True, index=True),
    Column("image_sha256", String(64), nullable=True, index=True),
    Column("image_bytes", Integer, nullable=True),  # None when the request failed before the bytes were read
    Column("width", Integer, nullable=True),
    Column("height", Integer, nullable=True),
    Column("format", String(16), nullable=True),
    Column("features", JSON, nullable=False),  # ["caption", "tags", "objects"]
    Column("outputs", JSON, nullable=False),  # the response body's results
    Column("model_versions", JSON, nullable=False),  # {"captioner": "3", "detector": "1"}
    Column("latencies", JSON, nullable=False),  # {"total": 81.2, "captioner": 60.1} in ms
    Column("status", Integer, nullable=False),
    Column("error_code", String(64), nullable=True),
    Column("image", LargeBinary, nullable=True),  # retained original bytes, when the gateway keeps them
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(128), ForeignKey("inference_log.request_id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("caption", Text, nullable=True),
    Column("rating", Integer, nullable=True),
    Column("reason", Text, nullable=True),
    Column("key_id", String(32), nullable=True),
    CheckConstraint("rating IS NULL OR (rating BETWEEN 1 AND 5)", name="feedback_rating_range"),
    CheckConstraint("caption IS NOT NULL OR rating IS NOT NULL", name="feedback_caption_or_rating"),
    Index("ix_feedback_request_id", "request_id"),
)


def default_database_url() -> str:
    """The gateway's embedded database: SQLite at ``$SNAP2CAPTION_HOME/gateway.db`` (``./var/gateway.db``)."""
    home = Path(os.environ.get("SNAP2CAPTION_HOME", "var")).expanduser().resolve()
    return f"sqlite:///{home / 'gateway.db'}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers (key checks, feedback) never wait for the log writer; busy_timeout: the CLI and
    # several gateway workers writing at once wait briefly instead of failing with "database is locked".
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """Open the gateway database at ``url``, creating the folder (SQLite) and the schema when missing.

    Args:
        url: SQLAlchemy URL: ``sqlite:///path/gateway.db``, ``sqlite://`` (in memory, one connection
            shared by all threads) or ``postgresql+psycopg://...``.

    Returns:
        The engine, ready to use.
    """
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    _create_schema(engine)
    return engine


def _create_schema(engine: Engine) -> None:
    try:
        metadata.create_all(engine)
    except SQLAlchemyError:
        # Two processes creating the schema at once: the loser's CREATE fails; fine if it now exists.
        existing = set(inspect(engine).get_table_names())
        if not set(metadata.tables) <= existing:
            raise
        logger.debug("schema created concurrently by another process")
