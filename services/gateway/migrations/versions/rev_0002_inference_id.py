"""The inference log's key is made by the server; the client's request id becomes a correlation id.

Before, ``inference_log.request_id`` (a client may choose it with ``X-Request-ID``) was the primary key:
a retry with the same id, or another client guessing it, made the insert fail and the record was lost.
Now ``id`` is the key (the gateway makes it) and ``request_id`` is an indexed, non-unique column;
feedback refers to ``inference_log.id`` through ``feedback.inference_id``.

Data: every existing row keeps its record, with its old request id as both its ``id`` and its
``request_id``; feedback keeps pointing at the same rows (``inference_id`` = the old ``request_id``).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None

# A SQLite database made before migrations has unnamed constraints: this convention (db.py's, frozen
# here as a revision must be) names them as PostgreSQL did, so the same drop_constraint works on both.
_CONVENTION = {"pk": "%(table_name)s_pkey", "fk": "%(table_name)s_%(column_0_name)s_fkey"}


def upgrade() -> None:
    with op.batch_alter_table("inference_log") as batch:
        batch.add_column(sa.Column("id", sa.String(160), nullable=True))
    op.execute("UPDATE inference_log SET id = request_id")
    # The foreign key goes first: on PostgreSQL it depends on the primary key it refers to.
    with op.batch_alter_table("feedback", naming_convention=_CONVENTION) as batch:
        batch.drop_constraint("feedback_request_id_fkey", type_="foreignkey")
        batch.drop_index("ix_feedback_request_id")
        batch.alter_column(
            "request_id", new_column_name="inference_id", existing_type=sa.String(128), type_=sa.String(160)
        )
    with op.batch_alter_table("inference_log", naming_convention=_CONVENTION) as batch:
        batch.drop_constraint("inference_log_pkey", type_="primary")
        batch.alter_column("id", existing_type=sa.String(160), nullable=False)
        batch.create_primary_key("inference_log_pkey", ["id"])
        batch.alter_column(
            "request_id", existing_type=sa.String(128), type_=sa.String(160), existing_nullable=False
        )
        batch.create_index("ix_inference_log_request_id", ["request_id"])
    with op.batch_alter_table("feedback", naming_convention=_CONVENTION) as batch:
        batch.create_foreign_key("feedback_inference_id_fkey", "inference_log", ["inference_id"], ["id"])
        batch.create_index("ix_feedback_inference_id", ["inference_id"])


def downgrade() -> None:
    """Back to the request id as the key. Each row's server ``id`` becomes its ``request_id`` again (the
    only unique value it has), so no row or feedback is lost, but correlation ids logged since 0002 are."""
    with op.batch_alter_table("feedback", naming_convention=_CONVENTION) as batch:
        batch.drop_constraint("feedback_inference_id_fkey", type_="foreignkey")
        batch.drop_index("ix_feedback_inference_id")
        batch.alter_column(
            "inference_id", new_column_name="request_id", existing_type=sa.String(160), type_=sa.String(128)
        )
    op.execute("UPDATE inference_log SET request_id = id")
    with op.batch_alter_table("inference_log", naming_convention=_CONVENTION) as batch:
        batch.drop_index("ix_inference_log_request_id")
        batch.drop_constraint("inference_log_pkey", type_="primary")
        batch.alter_column(
            "request_id", existing_type=sa.String(160), type_=sa.String(128), existing_nullable=False
        )
        batch.create_primary_key("inference_log_pkey", ["request_id"])
        batch.drop_column("id")
    with op.batch_alter_table("feedback", naming_convention=_CONVENTION) as batch:
        batch.create_foreign_key("feedback_request_id_fkey", "inference_log", ["request_id"], ["request_id"])
        batch.create_index("ix_feedback_request_id", ["request_id"])
