"""task placement: where the outbox published each task on the broker

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_OPEN = sa.text("state IN ('queued', 'leased')")


def upgrade() -> None:
    op.add_column("tasks", sa.Column("published_topic", sa.String(length=255), nullable=True))
    op.add_column("tasks", sa.Column("published_partition", sa.Integer(), nullable=True))
    op.add_column("tasks", sa.Column("published_offset", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_tasks_placement",
        "tasks",
        ["published_topic", "published_partition", "published_offset"],
        unique=False,
        postgresql_where=_OPEN,
        sqlite_where=_OPEN,
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_placement", table_name="tasks")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("published_offset")
        batch_op.drop_column("published_partition")
        batch_op.drop_column("published_topic")
