"""SQLModel tables of the gateway's store, with the column types that keep them portable.

Rows stop here and in ``ops``: the rest of the gateway sees ``records``. Every change to these
classes needs an alembic revision under ``migrations/versions`` (a test compares the two).
Addresses are ``String(512)``: long enough for any address the mapping hands out (it refuses
over-long parts), short enough to index on every backend we run.
"""

from __future__ import annotations

import enum
import json
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import DateTime, Dialect, Index, String, Text
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from .records import (
    ApprovalDirection,
    ApprovalState,
    JsonObject,
    MembershipState,
    MessageDirection,
    MessageState,
    SubscriptionState,
)

ADDRESS_LENGTH = 512
IDENTITY_LENGTH = 256  # an IMDN Message-ID at most (RFC 5438), or one of our stanza ids

E = TypeVar("E", bound=enum.StrEnum)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no time zones: it stores naive UTC text, which still sorts and compares correctly
    as long as every value is UTC, which this type enforces.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            # A naive datetime is ambiguous; refusing it here finds the bug at its source.
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class JsonText(TypeDecorator[JsonObject]):
    """A JSON object kept as TEXT, portable between SQLite and PostgreSQL (no JSONB needed)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: JsonObject | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)

    def process_result_value(self, value: str | None, dialect: Dialect) -> JsonObject | None:
        if value is None:
            return None
        loaded = json.loads(value)
        if not isinstance(loaded, dict):
            raise ValueError("JSON column does not hold an object")
        return loaded


class EnumText(TypeDecorator[E], Generic[E]):
    """A ``StrEnum`` kept as its string value in a VARCHAR (no native enum types to migrate)."""

    impl = String(16)
    cache_ok = True

    def __init__(self, enum_class: type[E]) -> None:
        super().__init__()
        self.enum_class = enum_class

    def process_bind_param(self, value: E | str | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return self.enum_class(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        return None if value is None else self.enum_class(value)

    def __repr__(self) -> str:
        return f"EnumText({self.enum_class.__name__})"


def _address(**kwargs: Any) -> Any:
    """A SIP AOR or JID column."""
    return Field(sa_type=String(ADDRESS_LENGTH), **kwargs)


def _when(**kwargs: Any) -> Any:
    """A UTC timestamp column."""
    return Field(sa_type=UTCDateTime(), **kwargs)


class QueuedMessageRow(SQLModel, table=True):
    """The message queue: every message acknowledged but not yet delivered (DESIGN 8)."""

    __tablename__ = "queued_message"
    __table_args__ = (
        Index("ix_queued_message_recipient_state", "recipient", "state"),
        Index("ix_queued_message_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    direction: MessageDirection = Field(sa_type=EnumText(MessageDirection), nullable=False)
    sender: str = _address(nullable=False)
    recipient: str = _address(nullable=False)
    body: str = Field(sa_type=Text, nullable=False)
    content_type: str = Field(sa_type=String(255), nullable=False)
    extra: JsonObject = Field(sa_type=JsonText(), nullable=False)
    created_at: datetime = _when(nullable=False)
    deliver_by: datetime = _when(nullable=False, index=True)
    attempts: int = Field(default=0, nullable=False)
    next_attempt_at: datetime = _when(nullable=False)
    state: MessageState = Field(sa_type=EnumText(MessageState), nullable=False)
    owner: str | None = Field(default=None, sa_type=String(255), nullable=True)
    last_error: str | None = Field(default=None, sa_type=Text, nullable=True)
    finished_at: datetime | None = _when(default=None, nullable=True)


class SeenUserRow(SQLModel, table=True):
    """Home-domain SIP users seen online, so a later 404 means offline, not unknown (DESIGN 4.2)."""

    __tablename__ = "seen_user"

    aor: str = _address(primary_key=True)
    last_seen: datetime = _when(nullable=False)
    online: bool = Field(nullable=False)
    contact: str | None = Field(default=None, sa_type=Text, nullable=True)
    expires_at: datetime | None = _when(default=None, nullable=True, index=True)


class SipWatcherSubscriptionRow(SQLModel, table=True):
    """SUBSCRIBE dialogs where a SIP user watches an XMPP entity and we notify (DESIGN 5.2)."""

    __tablename__ = "sip_watcher_subscription"

    dialog_id: str = _address(primary_key=True)
    watcher_aor: str = _address(nullable=False, index=True)
    target_jid: str = _address(nullable=False, index=True)
    event: str = Field(sa_type=String(64), nullable=False)
    state: SubscriptionState = Field(sa_type=EnumText(SubscriptionState), nullable=False)
    dialog: JsonObject = Field(sa_type=JsonText(), nullable=False)
    expires_at: datetime = _when(nullable=False, index=True)
    owner: str | None = Field(default=None, sa_type=String(255), nullable=True, index=True)


class XmppWatcherSubscriptionRow(SQLModel, table=True):
    """SUBSCRIBE dialogs the gateway holds for an XMPP user watching a SIP user (DESIGN 5.3)."""

    __tablename__ = "xmpp_watcher_subscription"

    watcher_jid: str = _address(primary_key=True)
    sip_aor: str = _address(primary_key=True, index=True)
    event: str = Field(sa_type=String(64), nullable=False)
    state: SubscriptionState = Field(sa_type=EnumText(SubscriptionState), nullable=False)
    dialog: JsonObject | None = Field(default=None, sa_type=JsonText(), nullable=True)
    expires_at: datetime | None = _when(default=None, nullable=True, index=True)
    owner: str | None = Field(default=None, sa_type=String(255), nullable=True, index=True)


class RosterApprovalRow(SQLModel, table=True):
    """XMPP presence subscription approvals between gateway JIDs and XMPP JIDs."""

    __tablename__ = "roster_approval"

    sip_jid: str = _address(primary_key=True)
    xmpp_jid: str = _address(primary_key=True, index=True)
    direction: ApprovalDirection = Field(sa_type=EnumText(ApprovalDirection), primary_key=True)
    state: ApprovalState = Field(sa_type=EnumText(ApprovalState), nullable=False)
    updated_at: datetime = _when(nullable=False)


class PresenceRow(SQLModel, table=True):
    """Last known presence per entity and resource, for probes and restarts."""

    __tablename__ = "presence"

    entity: str = _address(primary_key=True)
    resource: str = _address(primary_key=True)
    available: bool = Field(nullable=False)
    show: str | None = Field(default=None, sa_type=String(16), nullable=True)
    status: str | None = Field(default=None, sa_type=Text, nullable=True)
    priority: int = Field(default=0, nullable=False)
    updated_at: datetime = _when(nullable=False)
    pidf: str | None = Field(default=None, sa_type=Text, nullable=True)


class PublicationRow(SQLModel, table=True):
    """PUBLISH requests accepted for SIP users, by entity-tag (RFC 3903)."""

    __tablename__ = "publication"

    etag: str = Field(sa_type=String(128), primary_key=True)
    entity: str = _address(nullable=False, index=True)
    event: str = Field(sa_type=String(64), nullable=False)
    content_type: str = Field(sa_type=String(255), nullable=False)
    body: str = Field(sa_type=Text, nullable=False)
    expires_at: datetime = _when(nullable=False, index=True)
    owner: str | None = Field(default=None, sa_type=String(255), nullable=True, index=True)


class RoomMembershipRow(SQLModel, table=True):
    """Chat rooms SIP users are in, rejoined after a restart or reconnect (DESIGN 6)."""

    __tablename__ = "room_membership"

    sip_aor: str = _address(primary_key=True)
    room_jid: str = _address(primary_key=True, index=True)
    nick: str = _address(nullable=False)
    state: MembershipState = Field(sa_type=EnumText(MembershipState), nullable=False)
    # Kept in clear: the gateway must present it again to rejoin (XEP-0045 7.2.5).
    password: str | None = Field(default=None, sa_type=Text, nullable=True)
    owner: str | None = Field(default=None, sa_type=String(255), nullable=True, index=True)


class GatewayInstanceRow(SQLModel, table=True):
    """One row per gateway instance sharing the database: its heartbeat (DESIGN 9).

    ``owner`` in the tables above names a row here. An instance whose heartbeat is older than
    two ``check_time`` intervals, or that marked itself ``gone``, is dead: a survivor takes over
    what it owned.
    """

    __tablename__ = "gateway_instance"

    name: str = Field(sa_type=String(255), primary_key=True)
    started_at: datetime = _when(nullable=False)
    heartbeat_at: datetime = _when(nullable=False)
    gone: bool = Field(default=False, nullable=False)


class MessageIdentityRow(SQLModel, table=True):
    """Identities of relayed messages that asked for receipts or read markers, both ways, kept
    while a notification can come (DESIGN 4.3): any instance maps one, after a restart too."""

    __tablename__ = "message_identity"

    direction: MessageDirection = Field(sa_type=EnumText(MessageDirection), primary_key=True)
    recipient_id: str = Field(sa_type=String(IDENTITY_LENGTH), primary_key=True)
    recipient: str = _address(primary_key=True)
    sender: str = _address(nullable=False)
    sender_id: str = Field(sa_type=Text, nullable=False)
    sent_to: str = _address(nullable=False)
    sent_at: datetime | None = _when(default=None, nullable=True)
    delivery: bool = Field(nullable=False)
    display: bool = Field(nullable=False)
    expires_at: datetime = _when(nullable=False, index=True)


class TransportStatusRow(SQLModel, table=True):
    """Last probe result per alias transport domain (DESIGN 9)."""

    __tablename__ = "transport_status"

    domain: str = Field(sa_type=String(255), primary_key=True)
    up: bool = Field(nullable=False)
    checked_at: datetime = _when(nullable=False)
    detail: str | None = Field(default=None, sa_type=Text, nullable=True)


metadata = SQLModel.metadata
"""The metadata alembic compares against; every table above is registered on it."""
