"""Message identities: the ids of a relayed message that asked for receipts or read markers,
as each side knows it, kept while a notification can come (DESIGN 4.3).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 16:40:00

Before this revision the gateway kept them in memory only: a receipt that came after a
restart, or reached another instance, was dropped. The downgrade drops the table; the gateway
of 0003 never read it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``message_identity``, keyed by direction, the recipient's id and the recipient,
    with its expiry indexed for the sweep."""
    op.create_table(
        "message_identity",
        sa.Column("direction", sa.String(16), primary_key=True),
        sa.Column("recipient_id", sa.String(256), primary_key=True),
        sa.Column("recipient", sa.String(512), primary_key=True),
        sa.Column("sender", sa.String(512), nullable=False),
        sa.Column("sender_id", sa.Text(), nullable=False),
        sa.Column("sent_to", sa.String(512), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivery", sa.Boolean(), nullable=False),
        sa.Column("display", sa.Boolean(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_message_identity_expires_at", "message_identity", ["expires_at"])


def downgrade() -> None:
    """Drop ``message_identity``; identities are in memory only again."""
    op.drop_index("ix_message_identity_expires_at", table_name="message_identity")
    op.drop_table("message_identity")
