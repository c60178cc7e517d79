"""The gateway's database: API keys, the inference log and feedback (SQLAlchemy Core, SQLite or Postgres).

SQLite is the embedded default (``$SNAP2CAPTION_HOME/gateway.db``); a Postgres URL
(``postgresql+psycopg://user:pw@host/db``) runs the same code when one machine is not enough.
The schema's source of truth is the Alembic revisions in ``services/gateway/migrations/``; the tables
below must describe the same schema (a test compares them). :func:`make_engine` upgrades the database
to the newest revision when it opens it, so the gateway, its workers and the CLI can each open it first.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Double,
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
)
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from snap2caption.db import use_sqlite_pragmas

logger = logging.getLogger(__name__)

# Constraint names as PostgreSQL chooses them by default, given explicitly so that SQLite tables get the
# same names and a migration can drop a constraint by name on both.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "pk": "%(table_name)s_pkey",
    "fk": "%(table_name)s_%(column_0_name)s_fkey",
}
metadata = MetaData(naming_convention=NAMING_CONVENTION)

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
    # Made by the gateway (``inference_log.new_inference_id``, a 36-character UUIDv7) and returned as the
    # answer's ``inference_id``; rows logged before revision 0002 kept their request id as their id.
    Column("id", String(160), primary_key=True),
    # The request's X-Request-ID (the client's own, or made by the gateway; ``<id>.<n>`` for a batch
    # item, hence wider than the 128 characters a header may have): a correlation id, not unique,
    # since clients retry with the same one.
    Column("request_id", String(160), nullable=False, index=True),
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
    # The original bytes: retained by the gateway (``retain_images``), or sent back with feedback.
    Column("image", LargeBinary, nullable=True),
    # Which release track answered: ``production``, or ``canary`` when any backend call went to a canary.
    Column("track", String(16), nullable=False, server_default="production"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("inference_id", String(160), ForeignKey("inference_log.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("caption", Text, nullable=True),
    Column("rating", Integer, nullable=True),
    Column("reason", Text, nullable=True),
    Column("key_id", String(32), nullable=True),
    CheckConstraint("rating IS NULL OR (rating BETWEEN 1 AND 5)", name="feedback_rating_range"),
    CheckConstraint("caption IS NOT NULL OR rating IS NOT NULL", name="feedback_caption_or_rating"),
    Index("ix_feedback_inference_id", "inference_id"),
)

# Rate-limit buckets, shared by every gateway process of a deployment (``auth.RateLimiter``): one row per
# bucket (``key:<key id>``, or ``client:<address>`` without keys), holding its GCRA "theoretical arrival
# time" in Unix seconds. A row whose time has passed is a full bucket, the same as no row, and is swept.
rate_limits = Table(
    "rate_limits",
    metadata,
    Column("bucket", String(200), primary_key=True),
    Column("tat", Double, nullable=False, index=True),
)


# Model releases (``snap2caption release``): one row per model, its canary now or its last one. The gateway
# sends ``share`` percent of the traffic to the model's canary while ``state`` is ``running``.
releases = Table(
    "releases",
    metadata,
    Column("model", String(32), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("share", Double, nullable=False),
    Column("state", String(16), nullable=False),  # running, promoted, rolled_back
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=True),
)

# Every release decision (start, promote, rollback), automatic or by hand, with the numbers behind it.
release_decisions = Table(
    "release_decisions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(32), nullable=False),
    Column("version", Integer, nullable=False),
    Column("decision", String(16), nullable=False),  # start, promote, rollback
    Column("automatic", Boolean, nullable=False),
    Column("reason", Text, nullable=False),
    Column("numbers", JSON, nullable=False),  # the comparison it was made on ({} by hand)
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_release_decisions_model", "model"),
)


def default_database_url() -> str:
    """The gateway's embedded database: SQLite at ``$SNAP2CAPTION_HOME/gateway.db`` (``./var/gateway.db``)."""
    home = Path(os.environ.get("SNAP2CAPTION_HOME", "var")).expanduser().resolve()
    return f"sqlite:///{home / 'gateway.db'}"


def make_engine(url: str, migrate: bool = True) -> Engine:
    """Open the gateway database at ``url``, creating the folder (SQLite) and upgrading the schema.

    Args:
        url: SQLAlchemy URL: ``sqlite:///path/gateway.db``, ``sqlite://`` (in memory, one connection
            shared by all threads) or ``postgresql+psycopg://...``.
        migrate: Upgrade the schema to the newest revision (see ``services.gateway.migrations``);
            ``False`` opens the database as it is (to read its revision first).

    Returns:
        The engine, ready to use.

    Raises:
        migrations.SchemaError: The database was migrated by a newer version of the code, or holds tables
            that no revision made.
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
    use_sqlite_pragmas(engine)
    if migrate:
        from services.gateway.migrations import upgrade

        upgrade(engine)
    return engine
