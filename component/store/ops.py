"""The store's database work outside the message queue: one function per ``StorePort`` method.

Each takes a session first and then exactly the port method's parameters; ``store.Store`` runs
it in one transaction on its worker thread. The port documents what each does; the notes here
are about how. Rows map to records through ``mapping`` and never leave this package.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from .mapping import RowMapping, to_datetime, upsert
from .models import (
    PresenceRow,
    PublicationRow,
    QueuedMessageRow,
    RoomMembershipRow,
    RosterApprovalRow,
    SeenUserRow,
    SipWatcherSubscriptionRow,
    TransportStatusRow,
    XmppWatcherSubscriptionRow,
)
from .records import (
    ApprovalDirection,
    MessageState,
    PresenceRecord,
    Publication,
    RoomMembership,
    RosterApproval,
    SeenUser,
    SipWatcherSubscription,
    StoreCounts,
    TransportStatus,
    XmppWatcherSubscription,
)

SEEN = RowMapping(SeenUser, SeenUserRow)
SIP_WATCHERS = RowMapping(SipWatcherSubscription, SipWatcherSubscriptionRow)
XMPP_WATCHERS = RowMapping(XmppWatcherSubscription, XmppWatcherSubscriptionRow)
PUBLICATIONS = RowMapping(Publication, PublicationRow)
PRESENCE = RowMapping(PresenceRecord, PresenceRow)
APPROVALS = RowMapping(RosterApproval, RosterApprovalRow)
MEMBERSHIPS = RowMapping(RoomMembership, RoomMembershipRow)
TRANSPORTS = RowMapping(TransportStatus, TransportStatusRow)


# --- users seen online ------------------------------------------------------------------------


def mark_user_seen(
    session: Session, aor: str, now: float, contact: str | None = None, expires: float | None = None
) -> SeenUser:
    """Upsert of only the columns given, so a sighting without contact keeps the REGISTER's."""
    values: dict[str, Any] = {"aor": aor, "last_seen": to_datetime(now), "online": True}
    if contact is not None:
        values["contact"] = contact
    if expires is not None:
        values["expires_at"] = to_datetime(now + expires)
    upsert(session, SeenUserRow, values, SEEN.key_names)
    seen = SEEN.get(session, aor)
    assert seen is not None
    return seen


def user_seen_before(session: Session, aor: str) -> bool:
    """A key lookup."""
    return SEEN.get(session, aor) is not None


def seen_user(session: Session, aor: str) -> SeenUser | None:
    """A key lookup."""
    return SEEN.get(session, aor)


def _set_offline(*where: Any) -> Any:
    return update(SEEN.table).where(*where).values(online=False, expires_at=None)


def set_user_offline(session: Session, aor: str) -> bool:
    """One UPDATE; the row stays, so the user stays "seen before"."""
    return bool(SEEN.returning(session, _set_offline(*SEEN.matching(aor=aor))))


def expire_registrations(session: Session, now: float) -> list[SeenUser]:
    """One UPDATE ... RETURNING of the online rows whose expiry passed."""
    online = SEEN.column("online").is_(True)
    return SEEN.returning(session, _set_offline(online, *SEEN.expired_by(now)))


def online_users(session: Session) -> list[SeenUser]:
    """By AOR."""
    return SEEN.select(session, SEEN.column("online").is_(True))


# --- SIP users watching XMPP entities, XMPP users watching SIP users ------------------------


def save_sip_watcher_subscription(
    session: Session, owner: str, sub: SipWatcherSubscription
) -> None:
    """An upsert on the dialog id, naming ``owner`` (the saving instance) its owner."""
    SIP_WATCHERS.upsert(session, sub, owner=owner)


def sip_watcher_subscription(session: Session, dialog_id: str) -> SipWatcherSubscription | None:
    """A key lookup."""
    return SIP_WATCHERS.get(session, dialog_id)


def sip_watcher_subscriptions(
    session: Session, owner: str, target_jid: str | None = None, *, expired_at: float | None = None
) -> list[SipWatcherSubscription]:
    """By dialog id; with no filter, those ``owner`` holds."""
    where = SIP_WATCHERS.matching(target_jid=target_jid) + SIP_WATCHERS.expired_by(expired_at)
    return SIP_WATCHERS.select(session, *(where or SIP_WATCHERS.matching(owner=owner)))


def sip_watcher_page(
    session: Session, owner: str, after: str | None, limit: int
) -> list[SipWatcherSubscription]:
    """Up to ``limit`` of those ``owner`` holds, by dialog id, after ``after`` (a restart reads
    them a page at a time, so their rows are never all in memory at once)."""
    where = SIP_WATCHERS.matching(owner=owner)
    if after is not None:
        where.append(SIP_WATCHERS.table.c.dialog_id > after)
    return SIP_WATCHERS.select(session, *where, limit=limit)


def delete_sip_watcher_subscription(session: Session, dialog_id: str) -> bool:
    """A DELETE by key."""
    return SIP_WATCHERS.delete(session, dialog_id)


def save_xmpp_watcher_subscription(
    session: Session, owner: str, sub: XmppWatcherSubscription
) -> None:
    """An upsert on (watcher, SIP user), naming ``owner`` its owner."""
    XMPP_WATCHERS.upsert(session, sub, owner=owner)


def xmpp_watcher_subscription(
    session: Session, watcher_jid: str, sip_aor: str
) -> XmppWatcherSubscription | None:
    """A key lookup."""
    return XMPP_WATCHERS.get(session, watcher_jid, sip_aor)


def xmpp_watcher_subscriptions(
    session: Session,
    owner: str,
    sip_aor: str | None = None,
    *,
    expiring_before: float | None = None,
) -> list[XmppWatcherSubscription]:
    """By watcher, then SIP user; a subscription not yet answered (no expiry) never expires.
    With no filter, those ``owner`` holds."""
    where = XMPP_WATCHERS.matching(sip_aor=sip_aor) + XMPP_WATCHERS.expired_by(expiring_before)
    return XMPP_WATCHERS.select(session, *(where or XMPP_WATCHERS.matching(owner=owner)))


def delete_xmpp_watcher_subscription(session: Session, watcher_jid: str, sip_aor: str) -> bool:
    """A DELETE by key."""
    return XMPP_WATCHERS.delete(session, watcher_jid, sip_aor)


# --- publications and presence ---------------------------------------------------------------


def save_publication(session: Session, owner: str, pub: Publication) -> None:
    """An upsert on the entity-tag, naming ``owner`` its owner."""
    PUBLICATIONS.upsert(session, pub, owner=owner)


def publication(session: Session, etag: str) -> Publication | None:
    """A key lookup."""
    return PUBLICATIONS.get(session, etag)


def publications_of(session: Session, entity: str) -> list[Publication]:
    """By entity-tag."""
    return PUBLICATIONS.select(session, *PUBLICATIONS.matching(entity=entity))


def all_publications(session: Session, owner: str) -> list[Publication]:
    """Those ``owner`` holds, by entity, then entity-tag (restart resume, DESIGN 8)."""
    return PUBLICATIONS.select(
        session, *PUBLICATIONS.matching(owner=owner), order_by=("entity", "etag")
    )


def delete_publication(session: Session, etag: str) -> bool:
    """A DELETE by key."""
    return PUBLICATIONS.delete(session, etag)


def expire_publications(session: Session, now: float) -> list[Publication]:
    """One DELETE ... RETURNING (RFC 3903 section 4.1: an expired publication is gone)."""
    stmt = PUBLICATIONS.table.delete().where(*PUBLICATIONS.expired_by(now))
    return PUBLICATIONS.returning(session, stmt)


def save_presence(session: Session, record: PresenceRecord) -> None:
    """An upsert of every column: a new presence replaces the old one fully."""
    PRESENCE.upsert(session, record)


def presence_of(session: Session, entity: str) -> list[PresenceRecord]:
    """By resource."""
    return PRESENCE.select(session, *PRESENCE.matching(entity=entity))


def clear_presence(session: Session, entity: str, resource: str | None = None) -> int:
    """One DELETE; returns the rows deleted."""
    return PRESENCE.delete_where(session, *PRESENCE.matching(entity=entity, resource=resource))


# --- approvals, rooms, transports, counts -----------------------------------------------------


def save_approval(session: Session, approval: RosterApproval) -> None:
    """An upsert on (gateway JID, XMPP JID, direction)."""
    APPROVALS.upsert(session, approval)


def approval(
    session: Session, sip_jid: str, xmpp_jid: str, direction: ApprovalDirection
) -> RosterApproval | None:
    """A key lookup."""
    return APPROVALS.get(session, sip_jid, xmpp_jid, direction)


def approvals(
    session: Session, sip_jid: str | None = None, xmpp_jid: str | None = None
) -> list[RosterApproval]:
    """By key; all when both are None."""
    return APPROVALS.select(session, *APPROVALS.matching(sip_jid=sip_jid, xmpp_jid=xmpp_jid))


def delete_approval(
    session: Session, sip_jid: str, xmpp_jid: str, direction: ApprovalDirection
) -> bool:
    """A DELETE by key."""
    return APPROVALS.delete(session, sip_jid, xmpp_jid, direction)


def save_membership(session: Session, owner: str, membership: RoomMembership) -> None:
    """An upsert on (SIP user, room), naming ``owner`` its owner."""
    MEMBERSHIPS.upsert(session, membership, owner=owner)


def remove_membership(session: Session, sip_aor: str, room_jid: str) -> bool:
    """A DELETE by key."""
    return MEMBERSHIPS.delete(session, sip_aor, room_jid)


def memberships(
    session: Session, owner: str, sip_aor: str | None = None, room_jid: str | None = None
) -> list[RoomMembership]:
    """By key; those ``owner`` holds when both are None."""
    where = MEMBERSHIPS.matching(sip_aor=sip_aor, room_jid=room_jid)
    return MEMBERSHIPS.select(session, *(where or MEMBERSHIPS.matching(owner=owner)))


def save_transport_status(session: Session, status: TransportStatus) -> None:
    """An upsert on the domain."""
    TRANSPORTS.upsert(session, status)


def transport_status(session: Session, domain: str) -> TransportStatus | None:
    """A key lookup."""
    return TRANSPORTS.get(session, domain)


def transport_statuses(session: Session) -> list[TransportStatus]:
    """By domain."""
    return TRANSPORTS.select(session)


def counts(session: Session) -> StoreCounts:
    """The queue grouped by state in one query, then a COUNT per table."""
    state_column = QueuedMessageRow.__table__.c.state  # type: ignore[attr-defined]
    grouped = session.execute(select(state_column, func.count()).group_by(state_column))
    by_state = {MessageState(state): int(n) for state, n in grouped.all()}
    return StoreCounts(
        queued=by_state.get(MessageState.QUEUED, 0),
        inflight=by_state.get(MessageState.INFLIGHT, 0),
        delivered=by_state.get(MessageState.DELIVERED, 0),
        failed=by_state.get(MessageState.FAILED, 0),
        users_seen=SEEN.count(session),
        users_online=SEEN.count(session, SEEN.column("online").is_(True)),
        sip_watchers=SIP_WATCHERS.count(session),
        xmpp_watchers=XMPP_WATCHERS.count(session),
        publications=PUBLICATIONS.count(session),
        memberships=MEMBERSHIPS.count(session),
        transports_down=TRANSPORTS.count(session, TRANSPORTS.column("up").is_(False)),
    )
