"""The initial store: message queue, users seen, subscriptions, presence, rooms, transports.

Revision ID: 0001
Revises:
Create Date: 2025-11-26 09:00:00

Operations are written out rather than taken from the models, so this revision keeps meaning
the same schema however the models change later. Timestamps are timezone-aware UTC; JSON is
TEXT (portable between SQLite and PostgreSQL); enums are short strings.
"""

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADDRESS = sa.String(512)
STATE = sa.String(16)


def _when(name: str, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    """Create every table of the store and its indices."""
    op.create_table(
        "queued_message",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("direction", STATE, nullable=False),
        sa.Column("sender", ADDRESS, nullable=False),
        sa.Column("recipient", ADDRESS, nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("content_type", sa.String(255), nullable=False),
        sa.Column("extra", sa.Text(), nullable=False),
        _when("created_at"),
        _when("deliver_by"),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _when("next_attempt_at"),
        sa.Column("state", STATE, nullable=False),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        _when("finished_at", nullable=True),
    )
    op.create_index("ix_queued_message_recipient_state", "queued_message", ["recipient", "state"])
    op.create_index(
        "ix_queued_message_state_next_attempt_at", "queued_message", ["state", "next_attempt_at"]
    )
    op.create_index("ix_queued_message_deliver_by", "queued_message", ["deliver_by"])

    op.create_table(
        "seen_user",
        sa.Column("aor", ADDRESS, primary_key=True),
        _when("last_seen"),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("contact", sa.Text(), nullable=True),
        _when("expires_at", nullable=True),
    )
    op.create_index("ix_seen_user_expires_at", "seen_user", ["expires_at"])

    op.create_table(
        "sip_watcher_subscription",
        sa.Column("dialog_id", ADDRESS, primary_key=True),
        sa.Column("watcher_aor", ADDRESS, nullable=False),
        sa.Column("target_jid", ADDRESS, nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("state", STATE, nullable=False),
        sa.Column("dialog", sa.Text(), nullable=False),
        _when("expires_at"),
    )
    for column in ("watcher_aor", "target_jid", "expires_at"):
        op.create_index(
            f"ix_sip_watcher_subscription_{column}", "sip_watcher_subscription", [column]
        )

    op.create_table(
        "xmpp_watcher_subscription",
        sa.Column("watcher_jid", ADDRESS, primary_key=True),
        sa.Column("sip_aor", ADDRESS, primary_key=True),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("state", STATE, nullable=False),
        sa.Column("dialog", sa.Text(), nullable=True),
        _when("expires_at", nullable=True),
    )
    for column in ("sip_aor", "expires_at"):
        op.create_index(
            f"ix_xmpp_watcher_subscription_{column}", "xmpp_watcher_subscription", [column]
        )

    op.create_table(
        "roster_approval",
        sa.Column("sip_jid", ADDRESS, primary_key=True),
        sa.Column("xmpp_jid", ADDRESS, primary_key=True),
        sa.Column("direction", STATE, primary_key=True),
        sa.Column("state", STATE, nullable=False),
        _when("updated_at"),
    )
    op.create_index("ix_roster_approval_xmpp_jid", "roster_approval", ["xmpp_jid"])

    op.create_table(
        "presence",
        sa.Column("entity", ADDRESS, primary_key=True),
        sa.Column("resource", ADDRESS, primary_key=True),
        sa.Column("available", sa.Boolean(), nullable=False),
        sa.Column("show", STATE, nullable=True),
        sa.Column("status", sa.Text(), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        _when("updated_at"),
        sa.Column("pidf", sa.Text(), nullable=True),
    )

    op.create_table(
        "publication",
        sa.Column("etag", sa.String(128), primary_key=True),
        sa.Column("entity", ADDRESS, nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("content_type", sa.String(255), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        _when("expires_at"),
    )
    op.create_index("ix_publication_entity", "publication", ["entity"])
    op.create_index("ix_publication_expires_at", "publication", ["expires_at"])

    op.create_table(
        "room_membership",
        sa.Column("sip_aor", ADDRESS, primary_key=True),
        sa.Column("room_jid", ADDRESS, primary_key=True),
        sa.Column("nick", ADDRESS, nullable=False),
        sa.Column("state", STATE, nullable=False),
    )
    op.create_index("ix_room_membership_room_jid", "room_membership", ["room_jid"])

    op.create_table(
        "transport_status",
        sa.Column("domain", sa.String(255), primary_key=True),
        sa.Column("up", sa.Boolean(), nullable=False),
        _when("checked_at"),
        sa.Column("detail", sa.Text(), nullable=True),
    )


def downgrade() -> None:
    """Drop every table of the store (indices go with their tables)."""
    for table in (
        "transport_status",
        "room_membership",
        "publication",
        "presence",
        "roster_approval",
        "xmpp_watcher_subscription",
        "sip_watcher_subscription",
        "seen_user",
        "queued_message",
    ):
        op.drop_table(table)
