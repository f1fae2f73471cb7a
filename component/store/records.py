"""What the store hands back: frozen dataclasses and enums of our own, never SQLModel rows.

Times are POSIX seconds (``time.time()`` wall clock) as the cores use them; the store keeps them
as timezone-aware UTC ``datetime`` columns and converts at its edge.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

# The RFC 6665 states sipside names; re-exported so callers keep importing them from the store.
from sipside.events import SubscriptionState as SubscriptionState

__all__ = [
    "ApprovalDirection",
    "ApprovalState",
    "GatewayInstance",
    "IdentityKey",
    "JsonObject",
    "MembershipState",
    "MessageDirection",
    "MessageIdentity",
    "MessageState",
    "NewMessage",
    "PresenceRecord",
    "Publication",
    "QueuedMessage",
    "RecordNotFound",
    "RoomMembership",
    "RosterApproval",
    "SeatOwner",
    "SeenUser",
    "SipWatcherSubscription",
    "StoreCounts",
    "StoreError",
    "StoreNotAtHead",
    "StoreUnavailable",
    "SubscriptionState",
    "Takeover",
    "TransportStatus",
    "XmppWatcherSubscription",
]

JsonObject = dict[str, Any]
"""A JSON object as stored in a TEXT JSON column (dialog snapshots, message extras)."""


class StoreError(Exception):
    """The store could not do what was asked; the database error is the ``__cause__``."""


class StoreUnavailable(StoreError):
    """The database is unreachable, locked for too long, or closed: answer 503 and retry later."""


class RecordNotFound(StoreError, LookupError):
    """The record named by the caller does not exist (a bug on the caller's side, usually)."""


class StoreNotAtHead(StoreError):
    """The schema is not at the revision this code expects; the message says what to run."""


class MessageDirection(enum.StrEnum):
    """Which way a queued message travels."""

    SIP_TO_XMPP = "sip_to_xmpp"
    XMPP_TO_SIP = "xmpp_to_sip"


class MessageState(enum.StrEnum):
    """Life of a queued message: queued -> inflight -> delivered | failed (or back to queued)."""

    QUEUED = "queued"
    INFLIGHT = "inflight"
    DELIVERED = "delivered"
    FAILED = "failed"


class ApprovalDirection(enum.StrEnum):
    """Who asked to see whose presence in an XMPP roster approval."""

    SIP_WATCHES_XMPP = "sip_watches_xmpp"
    XMPP_WATCHES_SIP = "xmpp_watches_sip"


class ApprovalState(enum.StrEnum):
    """Outcome of an XMPP presence subscription request (RFC 6121 section 3)."""

    PENDING = "pending"
    APPROVED = "approved"
    REFUSED = "refused"


class MembershipState(enum.StrEnum):
    """Where a SIP user stands in a chat room: the join is sent, or the room confirmed it."""

    JOINING = "joining"
    JOINED = "joined"


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to queue: first tried at ``next_attempt_at``, given up at ``deliver_by``."""

    direction: MessageDirection
    sender: str
    recipient: str
    body: str
    content_type: str
    created_at: float
    deliver_by: float
    next_attempt_at: float
    extra: JsonObject = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message stored until delivered, failed or past ``deliver_by``."""

    id: int
    direction: MessageDirection
    sender: str
    recipient: str
    body: str
    content_type: str
    extra: JsonObject
    created_at: float
    deliver_by: float
    attempts: int
    next_attempt_at: float
    state: MessageState
    owner: str | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class IdentityKey:
    """Which message a notification names: the direction it was relayed, its recipient (bare
    JID or SIP AOR) and the id that recipient knows it by."""

    direction: MessageDirection
    recipient: str
    recipient_id: str


@dataclass(frozen=True, slots=True)
class MessageIdentity:
    """A relayed message that asked for receipts or read markers (DESIGN 4.3): the id each side
    knows it by, and what it takes to send a notification back, until ``expires_at``.

    SIP -> XMPP: ``recipient_id`` is our stanza id, ``sender_id`` the IMDN Message-ID,
    ``sent_to`` the SIP address it was sent to. XMPP -> SIP: ``recipient_id`` is the IMDN
    Message-ID, ``sender_id`` the stanza id, ``sent_to`` the SIP user's component JID.
    """

    direction: MessageDirection
    recipient: str
    recipient_id: str
    sender: str  # where notifications go: SIP AOR, or full JID
    sender_id: str
    sent_to: str
    sent_at: float | None  # the CPIM DateTime a notification repeats
    delivery: bool
    display: bool
    expires_at: float

    @property
    def key(self) -> IdentityKey:
        """The key a notification finds this by."""
        return IdentityKey(self.direction, self.recipient, self.recipient_id)


@dataclass(frozen=True, slots=True)
class SeenUser:
    """A home-domain SIP user the gateway has seen online at least once (DESIGN 4.2)."""

    aor: str
    last_seen: float
    online: bool
    contact: str | None = None
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class SipWatcherSubscription:
    """A SIP user watching an XMPP entity; the gateway is the notifier (DESIGN 5.2)."""

    dialog_id: str
    watcher_aor: str
    target_jid: str
    state: SubscriptionState
    dialog: JsonObject
    expires_at: float
    event: str = "presence"


@dataclass(frozen=True, slots=True)
class XmppWatcherSubscription:
    """An XMPP user watching a SIP user; the gateway is the subscriber (DESIGN 5.3).

    ``dialog`` and ``expires_at`` are None until the SIP side has answered the SUBSCRIBE.
    """

    watcher_jid: str
    sip_aor: str
    state: SubscriptionState
    dialog: JsonObject | None = None
    expires_at: float | None = None
    event: str = "presence"


@dataclass(frozen=True, slots=True)
class RosterApproval:
    """An XMPP presence subscription decision between a gateway JID and an XMPP JID."""

    sip_jid: str
    xmpp_jid: str
    direction: ApprovalDirection
    state: ApprovalState
    updated_at: float


@dataclass(frozen=True, slots=True)
class PresenceRecord:
    """Last known presence of one resource of an entity ('' for an entity without resources)."""

    entity: str
    resource: str
    available: bool
    show: str | None
    status: str | None
    priority: int
    updated_at: float
    pidf: str | None = None


@dataclass(frozen=True, slots=True)
class Publication:
    """A PUBLISH the gateway accepted for a SIP user (RFC 3903), keyed by our entity-tag."""

    etag: str
    entity: str
    body: str
    content_type: str
    expires_at: float
    event: str = "presence"


@dataclass(frozen=True, slots=True)
class RoomMembership:
    """A SIP user's seat in a chat room, kept so the gateway rejoins after a restart.

    ``password`` is the room password the user joined with: a password room cannot be rejoined
    without it.
    """

    sip_aor: str
    room_jid: str
    nick: str
    state: MembershipState
    password: str | None = None


@dataclass(frozen=True, slots=True)
class TransportStatus:
    """Result of the last probe of an alias transport domain (DESIGN 9, check_time)."""

    domain: str
    up: bool
    checked_at: float
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class GatewayInstance:
    """One gateway instance sharing the database: its heartbeat (DESIGN 9)."""

    name: str
    started_at: float
    heartbeat_at: float
    gone: bool = False


@dataclass(frozen=True, slots=True)
class SeatOwner:
    """Which instance holds a SIP user's seat in a room (DESIGN 9)."""

    sip_aor: str
    room_jid: str
    owner: str


@dataclass(frozen=True, slots=True)
class Takeover:
    """What ``take_over`` moved from a dead instance (or from no owner) to a survivor."""

    sip_watchers: int = 0
    xmpp_watchers: int = 0
    publications: int = 0
    memberships: int = 0
    messages: int = 0

    @property
    def total(self) -> int:
        """Rows moved, all tables together."""
        return (
            self.sip_watchers
            + self.xmpp_watchers
            + self.publications
            + self.memberships
            + self.messages
        )


@dataclass(frozen=True, slots=True)
class StoreCounts:
    """Row counts for metrics and the admin statistics command."""

    queued: int
    inflight: int
    delivered: int
    failed: int
    users_seen: int
    users_online: int
    sip_watchers: int
    xmpp_watchers: int
    publications: int
    memberships: int
    transports_down: int
