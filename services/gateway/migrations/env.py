"""Alembic's entry point for the gateway database; run by :func:`services.gateway.migrations.upgrade`.

It migrates over the connection the runner hands it (``config.attributes["connection"]``), inside the
runner's locked transaction, so there is no ``alembic.ini`` and no URL here.
"""

from __future__ import annotations

from alembic import context

from services.gateway.db import metadata
from services.gateway.migrations import VERSION_TABLE

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the gateway migrations through services.gateway.migrations.upgrade")
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    # SQLite cannot ALTER most things: batch operations copy the table instead (PostgreSQL ALTERs it).
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():  # the runner's transaction when it holds one (it always does)
    context.run_migrations()
