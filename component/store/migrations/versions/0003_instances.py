"""Several instances on one database: a heartbeat row per instance, and the owner instance of
each piece of per-user state (subscriptions both ways, publications, room memberships).

Revision ID: 0003
Revises: 0002
Create Date: 2025-12-04 09:00:00

``queued_message.owner`` exists since 0001 (the claim). Rows stored before this revision have
no owner: the first instance to start adopts them. Both directions use batch operations (a
table copy on SQLite, plain ALTER TABLE on PostgreSQL).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OWNED = ("sip_watcher_subscription", "xmpp_watcher_subscription", "publication", "room_membership")


def upgrade() -> None:
    """Create ``gateway_instance``; add an indexed, nullable ``owner`` to each owned table."""
    op.create_table(
        "gateway_instance",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("gone", sa.Boolean(), nullable=False),
    )
    for table in OWNED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("owner", sa.String(255), nullable=True))
            batch.create_index(f"ix_{table}_owner", ["owner"])


def downgrade() -> None:
    """Drop the owners and the heartbeat table; one instance owns everything again."""
    for table in OWNED:
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_owner")
            batch.drop_column("owner")
    op.drop_table("gateway_instance")
