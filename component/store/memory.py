"""An in-memory ``StorePort`` for core tests: the real store's semantics, no database.

``tests/test_store.py`` runs the same behavioural tests against it as against SQLite and
PostgreSQL. Two ``MemoryStore``s on one ``MemoryDatabase`` are two processes on one database
(a restart); ``unavailable`` makes every call raise ``StoreUnavailable``, as an outage would.
JSON fields are copied through ``json`` on the way in and out, as a JSON column would.
Strings sort by code point, as on SQLite.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .port import DEFAULT_LEASE, StorePort
from .records import (
    ApprovalDirection,
    GatewayInstance,
    IdentityKey,
    MessageDirection,
    MessageIdentity,
    MessageState,
    NewMessage,
    PresenceRecord,
    Publication,
    QueuedMessage,
    RecordNotFound,
    RoomMembership,
    RosterApproval,
    SeatOwner,
    SeenUser,
    SipWatcherSubscription,
    StoreCounts,
    StoreError,
    StoreUnavailable,
    Takeover,
    TransportStatus,
    XmppWatcherSubscription,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

R = TypeVar("R", bound="DataclassInstance")

EXPIRED_REASON = "expired"
_WAITING = (MessageState.QUEUED, MessageState.INFLIGHT)
_FINISHED = (MessageState.DELIVERED, MessageState.FAILED)


def _detached(record: R) -> R:
    """``record`` with its dict fields replaced by copies made through JSON, as a column would."""
    try:
        changes = {
            f.name: json.loads(json.dumps(value))
            for f in fields(record)
            if isinstance(value := getattr(record, f.name), dict)
        }
    except (TypeError, ValueError) as error:
        raise StoreError(f"database error: {error}") from error
    return replace(record, **changes) if changes else record


class _Table(Generic[R]):
    """Records of one type by primary key; listings come ordered by key, like the SQL store's."""

    def __init__(self, *key: str) -> None:
        self._key_names = key
        self._rows: dict[tuple[Any, ...], R] = {}
        self._owners: dict[tuple[Any, ...], str | None] = {}

    def _key(self, record: R) -> tuple[Any, ...]:
        return tuple(getattr(record, name) for name in self._key_names)

    def put(self, record: R, owner: str | None = None) -> R:
        """Insert or replace ``record`` (owned by ``owner``, for owned tables); returns it."""
        key = self._key(record)
        self._rows[key] = _detached(record)
        self._owners[key] = owner
        return record

    def owned_by(self, owner: str) -> Callable[[R], bool]:
        """A ``select`` condition: the record's owner instance is ``owner``."""
        return lambda record: self._owners.get(self._key(record)) == owner

    def take_over(self, dead: str | None, instance: str) -> int:
        """Give ``dead``'s records (None: those without owner) to ``instance``; how many."""
        keys = [key for key in self._rows if self._owners.get(key) == dead]
        for key in keys:
            self._owners[key] = instance
        return len(keys)

    def owner_of(self, record: R) -> str | None:
        """The instance ``record`` names its owner, if any."""
        return self._owners.get(self._key(record))

    def get(self, *key: Any) -> R | None:
        """The record with primary key ``key``, if stored."""
        found = self._rows.get(key)
        return None if found is None else _detached(found)

    def select(
        self,
        where: Callable[[R], bool] = lambda _: True,
        order: Callable[[R], Any] | None = None,
        **equal: Any,
    ) -> list[R]:
        """Records matching ``where`` and each field value given that is not None."""
        wanted = {name: value for name, value in equal.items() if value is not None}
        chosen = [
            _detached(record)
            for record in self._rows.values()
            if where(record) and all(getattr(record, n) == v for n, v in wanted.items())
        ]
        return sorted(chosen, key=order or self._key)

    def delete(self, *key: Any) -> bool:
        """Delete the record with primary key ``key``; False if there was none."""
        self._owners.pop(key, None)
        return self._rows.pop(key, None) is not None

    def delete_all(self, records: Iterable[R]) -> int:
        """Delete ``records``; returns how many."""
        keys = [self._key(record) for record in records]
        for key in keys:
            del self._rows[key]
            self._owners.pop(key, None)
        return len(keys)


@dataclass
class MemoryDatabase:
    """The tables one or more ``MemoryStore``s share."""

    messages: _Table[QueuedMessage] = field(default_factory=lambda: _Table("id"))
    finished_at: dict[int, float] = field(default_factory=dict)
    message_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    seen: _Table[SeenUser] = field(default_factory=lambda: _Table("aor"))
    sip_watchers: _Table[SipWatcherSubscription] = field(
        default_factory=lambda: _Table("dialog_id")
    )
    xmpp_watchers: _Table[XmppWatcherSubscription] = field(
        default_factory=lambda: _Table("watcher_jid", "sip_aor")
    )
    publications: _Table[Publication] = field(default_factory=lambda: _Table("etag"))
    presence: _Table[PresenceRecord] = field(default_factory=lambda: _Table("entity", "resource"))
    approvals: _Table[RosterApproval] = field(
        default_factory=lambda: _Table("sip_jid", "xmpp_jid", "direction")
    )
    memberships: _Table[RoomMembership] = field(
        default_factory=lambda: _Table("sip_aor", "room_jid")
    )
    transports: _Table[TransportStatus] = field(default_factory=lambda: _Table("domain"))
    instances: _Table[GatewayInstance] = field(default_factory=lambda: _Table("name"))
    identities: _Table[MessageIdentity] = field(
        default_factory=lambda: _Table("direction", "recipient_id", "recipient")
    )


def _waiting(message: QueuedMessage, now: float) -> bool:
    """Queued, or inflight with its claim lease over (its owner died)."""
    return message.state is MessageState.QUEUED or (
        message.state is MessageState.INFLIGHT and message.next_attempt_at <= now
    )


class MemoryStore:
    """``StorePort`` on dicts: for core tests. ``close()`` makes later calls unavailable."""

    def __init__(self, database: MemoryDatabase | None = None, instance: str = "") -> None:
        self.database = database if database is not None else MemoryDatabase()
        self.instance = instance
        self.unavailable = False
        self._closed = False

    @property
    def _db(self) -> MemoryDatabase:
        if self._closed:
            raise StoreUnavailable("store is closed")
        if self.unavailable:
            raise StoreUnavailable("database unavailable")
        return self.database

    async def close(self) -> None:
        """Later calls raise ``StoreUnavailable``; the database stays for another store."""
        self._closed = True

    # --- the message queue -----------------------------------------------------------------

    async def enqueue_message(self, message: NewMessage) -> QueuedMessage:
        db = self._db
        queued = QueuedMessage(
            id=next(db.message_ids),
            attempts=0,
            state=MessageState.QUEUED,
            owner=None,
            last_error=None,
            **{f.name: getattr(message, f.name) for f in fields(message)},
        )
        return _detached(db.messages.put(queued))

    def _claim(
        self, chosen: list[QueuedMessage], now: float, instance: str, lease: float
    ) -> list[QueuedMessage]:
        claimed = [
            replace(
                message,
                state=MessageState.INFLIGHT,
                owner=instance,
                attempts=message.attempts + 1,
                next_attempt_at=now + lease,
            )
            for message in chosen
        ]
        return sorted((self._db.messages.put(m) for m in claimed), key=lambda m: m.id)

    async def claim_due_messages(
        self, now: float, limit: int, instance: str, lease: float = DEFAULT_LEASE
    ) -> list[QueuedMessage]:
        due = self._db.messages.select(
            lambda m: m.state in _WAITING and m.next_attempt_at <= now < m.deliver_by,
            order=lambda m: (m.next_attempt_at, m.id),
        )
        return self._claim(due[: max(limit, 0)], now, instance, lease)

    async def claim_messages_for_recipient(
        self, recipient: str, now: float, instance: str, lease: float = DEFAULT_LEASE
    ) -> list[QueuedMessage]:
        chosen = self._db.messages.select(
            lambda m: _waiting(m, now) and m.deliver_by > now, recipient=recipient
        )
        return self._claim(chosen, now, instance, lease)

    async def messages_for_recipient(self, recipient: str) -> list[QueuedMessage]:
        return self._db.messages.select(lambda m: m.state in _WAITING, recipient=recipient)

    async def waiting_messages(self, limit: int | None = None) -> list[QueuedMessage]:
        waiting = self._db.messages.select(
            lambda m: m.state in _WAITING, order=lambda m: (m.created_at, m.id)
        )
        return waiting if limit is None else waiting[: max(limit, 0)]

    def _finish(self, message_id: int, now: float | None, **changes: Any) -> None:
        db = self._db
        message = db.messages.get(message_id)
        if message is None:
            raise RecordNotFound(f"no queued message {message_id}")
        db.messages.put(replace(message, owner=None, **changes))
        if now is not None:
            db.finished_at[message_id] = now

    async def mark_delivered(self, message_id: int, now: float) -> None:
        self._finish(message_id, now, state=MessageState.DELIVERED)

    async def mark_failed(self, message_id: int, reason: str, now: float) -> None:
        self._finish(message_id, now, state=MessageState.FAILED, last_error=reason)

    async def reschedule(
        self, message_id: int, next_attempt_at: float, reason: str | None = None
    ) -> None:
        self._finish(
            message_id,
            None,
            state=MessageState.QUEUED,
            next_attempt_at=next_attempt_at,
            last_error=reason,
        )

    async def release_claims(self, instance: str, now: float) -> int:
        db = self._db
        mine = db.messages.select(owner=instance, state=MessageState.INFLIGHT)
        for message in mine:
            db.messages.put(
                replace(message, state=MessageState.QUEUED, owner=None, next_attempt_at=now)
            )
        return len(mine)

    async def expire_messages(self, now: float) -> list[QueuedMessage]:
        db = self._db
        late = db.messages.select(lambda m: m.deliver_by <= now and _waiting(m, now))
        expired = [
            replace(m, state=MessageState.FAILED, owner=None, last_error=EXPIRED_REASON)
            for m in late
        ]
        for message in expired:
            db.messages.put(message)
            db.finished_at[message.id] = now
        return expired

    async def purge_finished(self, before: float) -> int:
        db = self._db
        done = db.messages.select(
            lambda m: m.state in _FINISHED and db.finished_at.get(m.id, before) < before
        )
        for message in done:
            del db.finished_at[message.id]
        return db.messages.delete_all(done)

    # --- users seen online -------------------------------------------------------------------

    async def mark_user_seen(
        self, aor: str, now: float, contact: str | None = None, expires: float | None = None
    ) -> SeenUser:
        db = self._db
        known = db.seen.get(aor) or SeenUser(aor, now, True)
        return db.seen.put(
            replace(
                known,
                last_seen=now,
                online=True,
                contact=known.contact if contact is None else contact,
                expires_at=known.expires_at if expires is None else now + expires,
            )
        )

    async def user_seen_before(self, aor: str) -> bool:
        return self._db.seen.get(aor) is not None

    async def seen_user(self, aor: str) -> SeenUser | None:
        return self._db.seen.get(aor)

    def _set_offline(self, users: list[SeenUser]) -> list[SeenUser]:
        return [self._db.seen.put(replace(u, online=False, expires_at=None)) for u in users]

    async def set_user_offline(self, aor: str) -> bool:
        return bool(self._set_offline(self._db.seen.select(aor=aor)))

    async def expire_registrations(self, now: float) -> list[SeenUser]:
        return self._set_offline(
            self._db.seen.select(
                lambda u: u.online and u.expires_at is not None and u.expires_at <= now
            )
        )

    async def online_users(self) -> list[SeenUser]:
        return self._db.seen.select(lambda u: u.online)

    # --- subscriptions both ways -------------------------------------------------------------

    async def save_sip_watcher_subscription(self, sub: SipWatcherSubscription) -> None:
        self._db.sip_watchers.put(sub, self.instance)

    async def sip_watcher_subscription(self, dialog_id: str) -> SipWatcherSubscription | None:
        return self._db.sip_watchers.get(dialog_id)

    async def sip_watcher_subscriptions(
        self, target_jid: str | None = None, *, expired_at: float | None = None
    ) -> list[SipWatcherSubscription]:
        table = self._db.sip_watchers
        if target_jid is None and expired_at is None:
            return table.select(table.owned_by(self.instance))
        return table.select(
            lambda s: expired_at is None or s.expires_at <= expired_at, target_jid=target_jid
        )

    async def sip_watcher_page(self, after: str | None, limit: int) -> list[SipWatcherSubscription]:
        table = self._db.sip_watchers
        owned = table.owned_by(self.instance)
        rows = table.select(lambda s: owned(s) and (after is None or s.dialog_id > after))
        return sorted(rows, key=lambda s: s.dialog_id)[:limit]

    async def delete_sip_watcher_subscription(self, dialog_id: str) -> bool:
        return self._db.sip_watchers.delete(dialog_id)

    async def save_xmpp_watcher_subscription(self, sub: XmppWatcherSubscription) -> None:
        self._db.xmpp_watchers.put(sub, self.instance)

    async def xmpp_watcher_subscription(
        self, watcher_jid: str, sip_aor: str
    ) -> XmppWatcherSubscription | None:
        return self._db.xmpp_watchers.get(watcher_jid, sip_aor)

    async def xmpp_watcher_subscriptions(
        self, sip_aor: str | None = None, *, expiring_before: float | None = None
    ) -> list[XmppWatcherSubscription]:
        def expiring(sub: XmppWatcherSubscription) -> bool:
            if expiring_before is None:
                return True
            return sub.expires_at is not None and sub.expires_at <= expiring_before

        table = self._db.xmpp_watchers
        if sip_aor is None and expiring_before is None:
            return table.select(table.owned_by(self.instance))
        return table.select(expiring, sip_aor=sip_aor)

    async def delete_xmpp_watcher_subscription(self, watcher_jid: str, sip_aor: str) -> bool:
        return self._db.xmpp_watchers.delete(watcher_jid, sip_aor)

    # --- publications and presence -----------------------------------------------------------

    async def save_publication(self, pub: Publication) -> None:
        self._db.publications.put(pub, self.instance)

    async def publication(self, etag: str) -> Publication | None:
        return self._db.publications.get(etag)

    async def publications_of(self, entity: str) -> list[Publication]:
        return self._db.publications.select(entity=entity)

    async def all_publications(self) -> list[Publication]:
        table = self._db.publications
        return table.select(table.owned_by(self.instance), order=lambda p: (p.entity, p.etag))

    async def delete_publication(self, etag: str) -> bool:
        return self._db.publications.delete(etag)

    async def expire_publications(self, now: float) -> list[Publication]:
        expired = self._db.publications.select(lambda p: p.expires_at <= now)
        self._db.publications.delete_all(expired)
        return expired

    async def save_presence(self, record: PresenceRecord) -> None:
        self._db.presence.put(record)

    async def presence_of(self, entity: str) -> list[PresenceRecord]:
        return self._db.presence.select(entity=entity)

    async def clear_presence(self, entity: str, resource: str | None = None) -> int:
        presence = self._db.presence
        return presence.delete_all(presence.select(entity=entity, resource=resource))

    # --- approvals, rooms, transports --------------------------------------------------------

    async def save_approval(self, approval: RosterApproval) -> None:
        self._db.approvals.put(approval)

    async def approval(
        self, sip_jid: str, xmpp_jid: str, direction: ApprovalDirection
    ) -> RosterApproval | None:
        return self._db.approvals.get(sip_jid, xmpp_jid, direction)

    async def approvals(
        self, sip_jid: str | None = None, xmpp_jid: str | None = None
    ) -> list[RosterApproval]:
        return self._db.approvals.select(sip_jid=sip_jid, xmpp_jid=xmpp_jid)

    async def delete_approval(
        self, sip_jid: str, xmpp_jid: str, direction: ApprovalDirection
    ) -> bool:
        return self._db.approvals.delete(sip_jid, xmpp_jid, direction)

    async def save_membership(self, membership: RoomMembership) -> None:
        self._db.memberships.put(membership, self.instance)

    async def remove_membership(self, sip_aor: str, room_jid: str) -> bool:
        return self._db.memberships.delete(sip_aor, room_jid)

    async def memberships(
        self, sip_aor: str | None = None, room_jid: str | None = None
    ) -> list[RoomMembership]:
        table = self._db.memberships
        if sip_aor is None and room_jid is None:
            return table.select(table.owned_by(self.instance))
        return table.select(sip_aor=sip_aor, room_jid=room_jid)

    async def save_transport_status(self, status: TransportStatus) -> None:
        self._db.transports.put(status)

    async def transport_status(self, domain: str) -> TransportStatus | None:
        return self._db.transports.get(domain)

    async def transport_statuses(self) -> list[TransportStatus]:
        return self._db.transports.select()

    # --- message identities (DESIGN 4.3) ---------------------------------------------------

    async def write_message_identities(
        self, saved: list[MessageIdentity], forgotten: list[IdentityKey]
    ) -> None:
        table = self._db.identities
        for identity in saved:
            table.put(identity)
        for key in forgotten:
            table.delete(key.direction, key.recipient_id, key.recipient)

    async def message_identity(
        self,
        direction: MessageDirection,
        recipient_id: str,
        now: float,
        recipient: str | None = None,
    ) -> MessageIdentity | None:
        found = self._db.identities.select(
            lambda i: i.expires_at > now,
            direction=direction,
            recipient_id=recipient_id,
            recipient=recipient,
        )
        return found[0] if found else None

    async def expire_message_identities(self, now: float) -> int:
        table = self._db.identities
        return table.delete_all(table.select(lambda i: i.expires_at <= now))

    async def counts(self) -> StoreCounts:
        db = self._db
        by_state = {state: 0 for state in MessageState}
        for message in db.messages.select():
            by_state[message.state] += 1
        return StoreCounts(
            queued=by_state[MessageState.QUEUED],
            inflight=by_state[MessageState.INFLIGHT],
            delivered=by_state[MessageState.DELIVERED],
            failed=by_state[MessageState.FAILED],
            users_seen=len(db.seen.select()),
            users_online=len(db.seen.select(lambda u: u.online)),
            sip_watchers=len(db.sip_watchers.select()),
            xmpp_watchers=len(db.xmpp_watchers.select()),
            publications=len(db.publications.select()),
            memberships=len(db.memberships.select()),
            transports_down=len(db.transports.select(lambda t: not t.up)),
        )

    # --- several instances (DESIGN 9) -------------------------------------------------------

    async def join_instances(self, instance: str, now: float) -> None:
        self._db.instances.put(GatewayInstance(instance, now, now))

    async def beat(self, instance: str, now: float) -> bool:
        table = self._db.instances
        row = table.get(instance)
        if row is None or row.gone:
            return False
        table.put(replace(row, heartbeat_at=now))
        return True

    async def leave_instances(self, instance: str, now: float) -> None:
        table = self._db.instances
        row = table.get(instance)
        if row is not None:
            table.put(replace(row, gone=True, heartbeat_at=now))

    async def instances(self) -> list[GatewayInstance]:
        return self._db.instances.select()

    async def take_over(self, dead: str | None, instance: str, now: float) -> Takeover:
        db = self._db
        messages = 0
        if dead is not None:
            messages = await self.release_claims(dead, now)
            db.instances.delete(dead)
        return Takeover(
            sip_watchers=db.sip_watchers.take_over(dead, instance),
            xmpp_watchers=db.xmpp_watchers.take_over(dead, instance),
            publications=db.publications.take_over(dead, instance),
            memberships=db.memberships.take_over(dead, instance),
            messages=messages,
        )

    async def seat_owners(self) -> list[SeatOwner]:
        table = self._db.memberships
        return [
            SeatOwner(m.sip_aor, m.room_jid, owner)
            for m in table.select()
            if (owner := table.owner_of(m)) is not None
        ]

    async def watcher_owners(self, target_jid: str) -> list[str]:
        table = self._db.sip_watchers
        found = {table.owner_of(s) for s in table.select(target_jid=target_jid)}
        return sorted(owner for owner in found if owner is not None)

    async def notify(self, channel: str, payloads: list[str]) -> None:
        raise StoreError("notifications between instances need PostgreSQL")


def _implements_port(store: MemoryStore) -> StorePort:
    """Never called: mypy checks here that ``MemoryStore`` has every ``StorePort`` method."""
    return store
