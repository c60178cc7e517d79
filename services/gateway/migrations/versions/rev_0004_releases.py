"""Model releases with a canary track: which track answered each logged inference, and the releases.

``inference_log.track`` says whether production or a canary answered (``production`` for every earlier
row, which production did); ``releases`` holds each model's canary (version, share of the traffic,
state) and ``release_decisions`` every start, promotion and rollback with the numbers behind it (see
``services.gateway.releases``).

Data: none to move; earlier rows get ``production``.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inference_log") as batch:
        batch.add_column(sa.Column("track", sa.String(16), nullable=False, server_default="production"))
    op.create_table(
        "releases",
        sa.Column("model", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("share", sa.Double, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("model", name="releases_pkey"),
    )
    op.create_table(
        "release_decisions",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("model", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("automatic", sa.Boolean, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("numbers", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="release_decisions_pkey"),
    )
    op.create_index("ix_release_decisions_model", "release_decisions", ["model"])


def downgrade() -> None:
    """Back to one track: the release tables and the log's track column go (the decisions with them)."""
    op.drop_index("ix_release_decisions_model", table_name="release_decisions")
    op.drop_table("release_decisions")
    op.drop_table("releases")
    with op.batch_alter_table("inference_log") as batch:
        batch.drop_column("track")
