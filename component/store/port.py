"""The store port: what the gateway's core needs from durable state, as a ``Protocol``.

``store.Store`` implements it; core tests pass ``memory.MemoryStore``. Methods are async because
the real store does its work on a thread of its own. Times are POSIX seconds.
"""

from __future__ import annotations

from typing import Protocol

from .records import (
    ApprovalDirection,
    GatewayInstance,
    IdentityKey,
    MessageDirection,
    MessageIdentity,
    NewMessage,
    PresenceRecord,
    Publication,
    QueuedMessage,
    RoomMembership,
    RosterApproval,
    SeatOwner,
    SeenUser,
    SipWatcherSubscription,
    StoreCounts,
    Takeover,
    TransportStatus,
    XmppWatcherSubscription,
)

DEFAULT_LEASE = 60.0
"""Seconds a claimed message stays with its instance before another may take it over."""


class StorePort(Protocol):
    """Durable gateway state: the message queue, users seen, subscriptions, presence, rooms."""

    async def enqueue_message(self, message: NewMessage) -> QueuedMessage:
        """Queue ``message`` (queued, no attempts yet); committed (durable) on return."""
        ...

    async def claim_due_messages(
        self, now: float, limit: int, instance: str, lease: float = DEFAULT_LEASE
    ) -> list[QueuedMessage]:
        """Claim up to ``limit`` due messages for ``instance`` (inflight for ``lease`` s)."""
        ...

    async def claim_messages_for_recipient(
        self, recipient: str, now: float, instance: str, lease: float = DEFAULT_LEASE
    ) -> list[QueuedMessage]:
        """Claim all waiting messages for ``recipient`` now, due or not (it came online)."""
        ...

    async def messages_for_recipient(self, recipient: str) -> list[QueuedMessage]:
        """Messages still waiting for ``recipient`` (read-only, e.g. for the admin command)."""
        ...

    async def waiting_messages(self, limit: int | None = None) -> list[QueuedMessage]:
        """Every queued or inflight message, oldest first; the first ``limit`` if given."""
        ...

    async def mark_delivered(self, message_id: int, now: float) -> None:
        """The message reached its recipient. Raises ``RecordNotFound`` for an unknown id."""
        ...

    async def mark_failed(self, message_id: int, reason: str, now: float) -> None:
        """The message is undeliverable; its sender is to be told ``reason``."""
        ...

    async def reschedule(
        self, message_id: int, next_attempt_at: float, reason: str | None = None
    ) -> None:
        """Return a claimed message to the queue, due at ``next_attempt_at``."""
        ...

    async def release_claims(self, instance: str, now: float) -> int:
        """Requeue ``instance``'s inflight messages, due now (at start-up and shutdown)."""
        ...

    async def expire_messages(self, now: float) -> list[QueuedMessage]:
        """Fail and return waiting messages past ``deliver_by``, so their senders are told."""
        ...

    async def purge_finished(self, before: float) -> int:
        """Delete delivered and failed messages finished before ``before``."""
        ...

    async def mark_user_seen(
        self, aor: str, now: float, contact: str | None = None, expires: float | None = None
    ) -> SeenUser:
        """``aor`` is online now (REGISTER, PUBLISH, a delivered message); ``expires`` in s."""
        ...

    async def user_seen_before(self, aor: str) -> bool:
        """Whether ``aor`` was ever seen online: then a 404 means offline (DESIGN 4.2)."""
        ...

    async def seen_user(self, aor: str) -> SeenUser | None:
        """What is known of ``aor``'s registration, if it was ever seen."""
        ...

    async def set_user_offline(self, aor: str) -> bool:
        """``aor`` went offline; False if it was never seen."""
        ...

    async def expire_registrations(self, now: float) -> list[SeenUser]:
        """Set offline and return users whose registration expired by ``now``."""
        ...

    async def online_users(self) -> list[SeenUser]:
        """Users currently online."""
        ...

    async def save_sip_watcher_subscription(self, sub: SipWatcherSubscription) -> None:
        """Insert or replace the subscription with ``sub.dialog_id``."""
        ...

    async def sip_watcher_subscription(self, dialog_id: str) -> SipWatcherSubscription | None:
        """The subscription of dialog ``dialog_id``, if stored."""
        ...

    async def sip_watcher_subscriptions(
        self, target_jid: str | None = None, *, expired_at: float | None = None
    ) -> list[SipWatcherSubscription]:
        """Those this instance owns (for a restart), those watching ``target_jid``, or those
        expired by a time."""
        ...

    async def sip_watcher_page(self, after: str | None, limit: int) -> list[SipWatcherSubscription]:
        """Up to ``limit`` of those this instance owns, by dialog id, after ``after``."""
        ...

    async def delete_sip_watcher_subscription(self, dialog_id: str) -> bool:
        """Forget the subscription of ``dialog_id``; False if there was none."""
        ...

    async def save_xmpp_watcher_subscription(self, sub: XmppWatcherSubscription) -> None:
        """Insert or replace the subscription of ``sub.watcher_jid`` to ``sub.sip_aor``."""
        ...

    async def xmpp_watcher_subscription(
        self, watcher_jid: str, sip_aor: str
    ) -> XmppWatcherSubscription | None:
        """The subscription of ``watcher_jid`` to ``sip_aor``, if stored."""
        ...

    async def xmpp_watcher_subscriptions(
        self, sip_aor: str | None = None, *, expiring_before: float | None = None
    ) -> list[XmppWatcherSubscription]:
        """Those this instance owns (for a restart), those watching ``sip_aor``, or those to
        refresh by a time."""
        ...

    async def delete_xmpp_watcher_subscription(self, watcher_jid: str, sip_aor: str) -> bool:
        """Forget the subscription; False if there was none."""
        ...

    async def save_publication(self, pub: Publication) -> None:
        """Insert or replace the publication with entity-tag ``pub.etag``."""
        ...

    async def publication(self, etag: str) -> Publication | None:
        """The publication with entity-tag ``etag``, if stored."""
        ...

    async def publications_of(self, entity: str) -> list[Publication]:
        """Every stored publication for ``entity``."""
        ...

    async def all_publications(self) -> list[Publication]:
        """Every publication this instance owns, in one query (restart resume)."""
        ...

    async def delete_publication(self, etag: str) -> bool:
        """Forget a publication (Expires: 0); False if there was none."""
        ...

    async def expire_publications(self, now: float) -> list[Publication]:
        """Delete and return publications expired by ``now``."""
        ...

    async def save_presence(self, record: PresenceRecord) -> None:
        """Insert or replace the presence of ``record.entity``/``record.resource``."""
        ...

    async def presence_of(self, entity: str) -> list[PresenceRecord]:
        """Last known presence of each of ``entity``'s resources."""
        ...

    async def clear_presence(self, entity: str, resource: str | None = None) -> int:
        """Forget one resource's presence, or all of ``entity``'s."""
        ...

    async def save_approval(self, approval: RosterApproval) -> None:
        """Insert or replace a subscription decision between a gateway JID and an XMPP JID."""
        ...

    async def approval(
        self, sip_jid: str, xmpp_jid: str, direction: ApprovalDirection
    ) -> RosterApproval | None:
        """The stored decision, if any."""
        ...

    async def approvals(
        self, sip_jid: str | None = None, xmpp_jid: str | None = None
    ) -> list[RosterApproval]:
        """Decisions involving ``sip_jid`` and/or ``xmpp_jid``."""
        ...

    async def delete_approval(
        self, sip_jid: str, xmpp_jid: str, direction: ApprovalDirection
    ) -> bool:
        """Forget a decision; False if there was none."""
        ...

    async def save_membership(self, membership: RoomMembership) -> None:
        """Insert or replace a SIP user's seat in a room (nick and room password included)."""
        ...

    async def remove_membership(self, sip_aor: str, room_jid: str) -> bool:
        """Forget a seat (the user left); False if there was none."""
        ...

    async def memberships(
        self, sip_aor: str | None = None, room_jid: str | None = None
    ) -> list[RoomMembership]:
        """Seats of ``sip_aor`` and/or in ``room_jid``; with neither, those this instance owns
        (to rejoin after a restart)."""
        ...

    async def save_transport_status(self, status: TransportStatus) -> None:
        """Insert or replace the result of probing alias transport ``status.domain``."""
        ...

    async def transport_status(self, domain: str) -> TransportStatus | None:
        """The last probe result for ``domain``, if it was ever probed."""
        ...

    async def transport_statuses(self) -> list[TransportStatus]:
        """The last probe result of every transport."""
        ...

    async def write_message_identities(
        self, saved: list[MessageIdentity], forgotten: list[IdentityKey]
    ) -> None:
        """Insert or replace ``saved`` and forget ``forgotten``, in one transaction (DESIGN
        4.3: the identities of messages that asked for notifications, written in batches)."""
        ...

    async def message_identity(
        self,
        direction: MessageDirection,
        recipient_id: str,
        now: float,
        recipient: str | None = None,
    ) -> MessageIdentity | None:
        """The identity of the message ``recipient`` knows as ``recipient_id``, unless it
        expired by ``now``; without ``recipient``, whoever received it."""
        ...

    async def expire_message_identities(self, now: float) -> int:
        """Delete identities expired by ``now``; how many."""
        ...

    async def counts(self) -> StoreCounts:
        """Queue depth by state and other row counts, for metrics."""
        ...

    # Several instances on one database (DESIGN 9). Every save of a subscription, publication
    # or membership names the saving instance its owner.

    async def join_instances(self, instance: str, now: float) -> None:
        """``instance`` starts: its heartbeat row, beating now and not gone."""
        ...

    async def beat(self, instance: str, now: float) -> bool:
        """Renew ``instance``'s heartbeat; False when it was marked gone or taken over."""
        ...

    async def leave_instances(self, instance: str, now: float) -> None:
        """``instance`` stops: marked gone, so a survivor takes over at once."""
        ...

    async def instances(self) -> list[GatewayInstance]:
        """Every instance's heartbeat row, by name."""
        ...

    async def take_over(self, dead: str | None, instance: str, now: float) -> Takeover:
        """Move what ``dead`` owned (None: rows without owner) to ``instance``: its rows, its
        claimed messages back to the queue due now; ``dead``'s heartbeat row is deleted."""
        ...

    async def seat_owners(self) -> list[SeatOwner]:
        """Every seat that names its owner instance, with it."""
        ...

    async def watcher_owners(self, target_jid: str) -> list[str]:
        """The instances holding SIP users' subscriptions to ``target_jid``'s presence."""
        ...

    async def notify(self, channel: str, payloads: list[str]) -> None:
        """Send ``payloads`` to whoever listens on ``channel``, together and in order
        (PostgreSQL NOTIFY; several instances need PostgreSQL)."""
        ...
