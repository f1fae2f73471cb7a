"""The gateway's durable state: SQLModel tables behind an async, domain-named facade.

The core talks to ``StorePort``; ``Store`` implements it on SQLite or PostgreSQL, and
``memory.MemoryStore`` in memory for core tests. Schema changes are alembic revisions
(``migrate``).
"""

from .migrate import check_at_head, current_revision, head_revision, upgrade
from .port import DEFAULT_LEASE, StorePort
from .records import (
    ApprovalDirection,
    ApprovalState,
    JsonObject,
    MembershipState,
    MessageDirection,
    MessageState,
    PresenceRecord,
    Publication,
    QueuedMessage,
    RecordNotFound,
    RoomMembership,
    RosterApproval,
    SeenUser,
    SipWatcherSubscription,
    StoreCounts,
    StoreError,
    StoreNotAtHead,
    StoreUnavailable,
    SubscriptionState,
    TransportStatus,
    XmppWatcherSubscription,
)
from .store import Store

__all__ = [
    "DEFAULT_LEASE",
    "ApprovalDirection",
    "ApprovalState",
    "JsonObject",
    "MembershipState",
    "MessageDirection",
    "MessageState",
    "PresenceRecord",
    "Publication",
    "QueuedMessage",
    "RecordNotFound",
    "RoomMembership",
    "RosterApproval",
    "SeenUser",
    "SipWatcherSubscription",
    "Store",
    "StoreCounts",
    "StoreError",
    "StoreNotAtHead",
    "StorePort",
    "StoreUnavailable",
    "SubscriptionState",
    "TransportStatus",
    "XmppWatcherSubscription",
    "check_at_head",
    "current_revision",
    "head_revision",
    "upgrade",
]
