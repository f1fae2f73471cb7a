"""Room memberships keep the room password, so a password room is rejoined after a restart.

Revision ID: 0002
Revises: 0001
Create Date: 2025-12-03 10:00:00

SQLite cannot drop a column in place before 3.35, so both directions use a batch operation
(a table copy on SQLite, a plain ALTER TABLE on PostgreSQL).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``room_membership.password`` (NULL: no password, as every seat stored before)."""
    with op.batch_alter_table("room_membership") as batch:
        batch.add_column(sa.Column("password", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop ``room_membership.password``; stored passwords are lost."""
    with op.batch_alter_table("room_membership") as batch:
        batch.drop_column("password")
