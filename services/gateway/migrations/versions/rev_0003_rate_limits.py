"""Rate-limit buckets move into the database, so every gateway process of a deployment shares them.

Before, each process counted in memory, and N workers let a key through at N times its limit. The new
``rate_limits`` table holds one row per bucket with its GCRA "theoretical arrival time" (Unix seconds);
see ``services.gateway.auth.RateLimiter``.

Data: none to move; a bucket with no row is a full one, as a process's empty memory was.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rate_limits",
        sa.Column("bucket", sa.String(200), nullable=False),
        sa.Column("tat", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("bucket", name="rate_limits_pkey"),
    )
    op.create_index("ix_rate_limits_tat", "rate_limits", ["tat"])


def downgrade() -> None:
    """Back to per-process buckets: the table goes (its rows are transient state, nothing is lost)."""
    op.drop_index("ix_rate_limits_tat", table_name="rate_limits")
    op.drop_table("rate_limits")
