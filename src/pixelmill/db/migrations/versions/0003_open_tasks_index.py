"""open tasks index: claims scan only queued and leased tasks

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_OPEN = sa.text("state IN ('queued', 'leased')")


def upgrade() -> None:
    op.create_index(
        "ix_tasks_open",
        "tasks",
        ["priority", "id"],
        unique=False,
        postgresql_where=_OPEN,
        sqlite_where=_OPEN,
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_open", table_name="tasks")
