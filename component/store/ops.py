"""The store's database work: plain synchronous functions over a SQLAlchemy session.

Only the store's worker thread calls these (see ``store.Store``); each runs inside one
transaction that the caller commits. They take and return ``records``; rows never leave.
The message queue's functions are in ``queue``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlmodel import SQLModel, col

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
    ApprovalState,
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


def to_datetime(ts: float) -> datetime:
    """POSIX seconds -> aware UTC datetime, the form the columns hold."""
    return datetime.fromtimestamp(ts, UTC)


def to_timestamp(value: datetime) -> float:
    """Aware datetime -> POSIX seconds, the form records carry."""
    return value.timestamp()


def _ts_or_none(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _upsert(
    session: Session, model: type[SQLModel], values: dict[str, Any], keys: Sequence[str]
) -> None:
    """Insert or update one row in one statement, so concurrent instances cannot collide."""
    table = model.__table__  # type: ignore[attr-defined]
    changed = {k: v for k, v in values.items() if k not in keys}
    match session.get_bind().dialect.name:
        case "postgresql":
            pg = postgresql.insert(table).values(values)
            session.execute(pg.on_conflict_do_update(index_elements=list(keys), set_=changed))
        case "sqlite":
            lite = sqlite.insert(table).values(values)
            session.execute(lite.on_conflict_do_update(index_elements=list(keys), set_=changed))
        case _:
            # Other backends: the ORM's read-then-write; fine for a single instance.
            session.merge(model(**values))


# --- users seen online ------------------------------------------------------------------------


def _seen(row: SeenUserRow) -> SeenUser:
    return SeenUser(
        aor=row.aor,
        last_seen=to_timestamp(row.last_seen),
        online=row.online,
        contact=row.contact,
        expires_at=_ts_or_none(row.expires_at),
    )


def mark_user_seen(
    session: Session, aor: str, now: float, contact: str | None, expires: float | None
) -> SeenUser:
    """Record ``aor`` as online now; contact and expiry are kept unless new ones are given."""
    values: dict[str, Any] = {"aor": aor, "last_seen": to_datetime(now), "online": True}
    if contact is not None:
        values["contact"] = contact
    if expires is not None:
        values["expires_at"] = to_datetime(now + expires)
    _upsert(session, SeenUserRow, values, ["aor"])
    row = session.get(SeenUserRow, aor, populate_existing=True)
    assert row is not None
    return _seen(row)


def seen_user(session: Session, aor: str) -> SeenUser | None:
    """What the store knows of ``aor``, or None if it was never seen."""
    row = session.get(SeenUserRow, aor)
    return None if row is None else _seen(row)


def set_user_offline(session: Session, aor: str) -> bool:
    """Mark ``aor`` offline (it stays "seen before"); False if it was never seen."""
    t = SeenUserRow
    stmt = (
        update(t)
        .where(col(t.aor) == aor)
        .values(online=False, expires_at=None)
        .returning(col(t.aor))
    )
    return session.execute(stmt).first() is not None


def expire_registrations(session: Session, now: float) -> list[SeenUser]:
    """Mark offline every online user whose registration expired; returns them."""
    t = SeenUserRow
    stmt = (
        update(t)
        .where(col(t.online).is_(True), col(t.expires_at) <= to_datetime(now))
        .values(online=False, expires_at=None)
        .returning(t)
        .execution_options(synchronize_session=False)
    )
    return sorted((_seen(r) for r in session.scalars(stmt)), key=lambda u: u.aor)


def online_users(session: Session) -> list[SeenUser]:
    """Users currently online, by AOR."""
    t = SeenUserRow
    stmt = select(t).where(col(t.online).is_(True)).order_by(col(t.aor))
    return [_seen(r) for r in session.scalars(stmt)]


# --- subscriptions, publications, presence -----------------------------------------------


def _sip_watcher(row: SipWatcherSubscriptionRow) -> SipWatcherSubscription:
    return SipWatcherSubscription(
        dialog_id=row.dialog_id,
        watcher_aor=row.watcher_aor,
        target_jid=row.target_jid,
        state=row.state,
        dialog=dict(row.dialog),
        expires_at=to_timestamp(row.expires_at),
        event=row.event,
    )


def save_sip_watcher_subscription(session: Session, sub: SipWatcherSubscription) -> None:
    """Insert or replace the subscription with ``sub.dialog_id``."""
    values: dict[str, Any] = {
        "dialog_id": sub.dialog_id,
        "watcher_aor": sub.watcher_aor,
        "target_jid": sub.target_jid,
        "event": sub.event,
        "state": sub.state,
        "dialog": dict(sub.dialog),
        "expires_at": to_datetime(sub.expires_at),
    }
    _upsert(session, SipWatcherSubscriptionRow, values, ["dialog_id"])


def sip_watcher_subscriptions(
    session: Session, target_jid: str | None, expired_at: float | None
) -> list[SipWatcherSubscription]:
    """All subscriptions, or those watching ``target_jid``, or those expired at ``expired_at``."""
    t = SipWatcherSubscriptionRow
    stmt = select(t).order_by(col(t.dialog_id))
    if target_jid is not None:
        stmt = stmt.where(col(t.target_jid) == target_jid)
    if expired_at is not None:
        stmt = stmt.where(col(t.expires_at) <= to_datetime(expired_at))
    return [_sip_watcher(r) for r in session.scalars(stmt)]


def sip_watcher_subscription(session: Session, dialog_id: str) -> SipWatcherSubscription | None:
    """The subscription of dialog ``dialog_id``, if stored."""
    row = session.get(SipWatcherSubscriptionRow, dialog_id)
    return None if row is None else _sip_watcher(row)


def _xmpp_watcher(row: XmppWatcherSubscriptionRow) -> XmppWatcherSubscription:
    return XmppWatcherSubscription(
        watcher_jid=row.watcher_jid,
        sip_aor=row.sip_aor,
        state=row.state,
        dialog=None if row.dialog is None else dict(row.dialog),
        expires_at=_ts_or_none(row.expires_at),
        event=row.event,
    )


def save_xmpp_watcher_subscription(session: Session, sub: XmppWatcherSubscription) -> None:
    """Insert or replace the subscription of ``sub.watcher_jid`` to ``sub.sip_aor``."""
    values: dict[str, Any] = {
        "watcher_jid": sub.watcher_jid,
        "sip_aor": sub.sip_aor,
        "event": sub.event,
        "state": sub.state,
        "dialog": None if sub.dialog is None else dict(sub.dialog),
        "expires_at": None if sub.expires_at is None else to_datetime(sub.expires_at),
    }
    _upsert(session, XmppWatcherSubscriptionRow, values, ["watcher_jid", "sip_aor"])


def xmpp_watcher_subscriptions(
    session: Session, sip_aor: str | None, expiring_before: float | None
) -> list[XmppWatcherSubscription]:
    """All, or those watching ``sip_aor``, or those expiring by ``expiring_before`` (refresh)."""
    t = XmppWatcherSubscriptionRow
    stmt = select(t).order_by(col(t.watcher_jid), col(t.sip_aor))
    if sip_aor is not None:
        stmt = stmt.where(col(t.sip_aor) == sip_aor)
    if expiring_before is not None:
        stmt = stmt.where(col(t.expires_at) <= to_datetime(expiring_before))
    return [_xmpp_watcher(r) for r in session.scalars(stmt)]


def xmpp_watcher_subscription(
    session: Session, watcher_jid: str, sip_aor: str
) -> XmppWatcherSubscription | None:
    """The subscription of ``watcher_jid`` to ``sip_aor``, if stored."""
    row = session.get(XmppWatcherSubscriptionRow, (watcher_jid, sip_aor))
    return None if row is None else _xmpp_watcher(row)


def _publication(row: PublicationRow) -> Publication:
    return Publication(
        etag=row.etag,
        entity=row.entity,
        body=row.body,
        content_type=row.content_type,
        expires_at=to_timestamp(row.expires_at),
        event=row.event,
    )


def save_publication(session: Session, pub: Publication) -> None:
    """Insert or replace the publication with entity-tag ``pub.etag``."""
    values: dict[str, Any] = {
        "etag": pub.etag,
        "entity": pub.entity,
        "event": pub.event,
        "content_type": pub.content_type,
        "body": pub.body,
        "expires_at": to_datetime(pub.expires_at),
    }
    _upsert(session, PublicationRow, values, ["etag"])


def publication(session: Session, etag: str) -> Publication | None:
    """The publication with entity-tag ``etag``, if stored."""
    row = session.get(PublicationRow, etag)
    return None if row is None else _publication(row)


def publications_of(session: Session, entity: str) -> list[Publication]:
    """Publications for ``entity``, by entity-tag."""
    t = PublicationRow
    stmt = select(t).where(col(t.entity) == entity).order_by(col(t.etag))
    return [_publication(r) for r in session.scalars(stmt)]


def all_publications(session: Session) -> list[Publication]:
    """Every stored publication, by entity then entity-tag (restart resume, DESIGN 8)."""
    t = PublicationRow
    stmt = select(t).order_by(col(t.entity), col(t.etag))
    return [_publication(r) for r in session.scalars(stmt)]


def expire_publications(session: Session, now: float) -> list[Publication]:
    """Delete and return publications whose expiry passed (RFC 3903 section 4.1)."""
    t = PublicationRow
    stmt = (
        delete(t)
        .where(col(t.expires_at) <= to_datetime(now))
        .returning(t)
        .execution_options(synchronize_session=False)
    )
    return sorted((_publication(r) for r in session.scalars(stmt)), key=lambda p: p.etag)


def delete_by_key(session: Session, /, model: type[SQLModel], **key: str) -> bool:
    """Delete the row with primary key ``key``; False if there was none."""
    table = model.__table__  # type: ignore[attr-defined]
    stmt = delete(table).where(*(table.c[k] == v for k, v in key.items()))
    return len(session.execute(stmt.returning(*table.primary_key.columns)).all()) > 0


def _presence(row: PresenceRow) -> PresenceRecord:
    return PresenceRecord(
        entity=row.entity,
        resource=row.resource,
        available=row.available,
        show=row.show,
        status=row.status,
        priority=row.priority,
        updated_at=to_timestamp(row.updated_at),
        pidf=row.pidf,
    )


def set_presence(session: Session, record: PresenceRecord) -> None:
    """Insert or replace the presence of ``record.entity``/``record.resource``."""
    values: dict[str, Any] = {
        "entity": record.entity,
        "resource": record.resource,
        "available": record.available,
        "show": record.show,
        "status": record.status,
        "priority": record.priority,
        "updated_at": to_datetime(record.updated_at),
        "pidf": record.pidf,
    }
    _upsert(session, PresenceRow, values, ["entity", "resource"])


def presence_of(session: Session, entity: str) -> list[PresenceRecord]:
    """Every stored resource's presence for ``entity``, by resource."""
    t = PresenceRow
    stmt = select(t).where(col(t.entity) == entity).order_by(col(t.resource))
    return [_presence(r) for r in session.scalars(stmt)]


def clear_presence(session: Session, entity: str, resource: str | None) -> int:
    """Forget the presence of one resource, or of all of ``entity``'s; returns rows deleted."""
    t = PresenceRow
    stmt = delete(t).where(col(t.entity) == entity)
    if resource is not None:
        stmt = stmt.where(col(t.resource) == resource)
    return len(session.execute(stmt.returning(col(t.resource))).all())


# --- approvals, rooms, transports, counts -------------------------------------------------


def _approval(row: RosterApprovalRow) -> RosterApproval:
    return RosterApproval(
        sip_jid=row.sip_jid,
        xmpp_jid=row.xmpp_jid,
        direction=row.direction,
        state=row.state,
        updated_at=to_timestamp(row.updated_at),
    )


def set_approval(
    session: Session,
    sip_jid: str,
    xmpp_jid: str,
    direction: ApprovalDirection,
    state: ApprovalState,
    now: float,
) -> RosterApproval:
    """Record the decision on one subscription request between two JIDs."""
    values: dict[str, Any] = {
        "sip_jid": sip_jid,
        "xmpp_jid": xmpp_jid,
        "direction": direction,
        "state": state,
        "updated_at": to_datetime(now),
    }
    _upsert(session, RosterApprovalRow, values, ["sip_jid", "xmpp_jid", "direction"])
    return RosterApproval(sip_jid, xmpp_jid, direction, state, now)


def approval(
    session: Session, sip_jid: str, xmpp_jid: str, direction: ApprovalDirection
) -> RosterApproval | None:
    """The stored decision between the two JIDs in ``direction``, if any."""
    row = session.get(RosterApprovalRow, (sip_jid, xmpp_jid, direction))
    return None if row is None else _approval(row)


def approvals(session: Session, sip_jid: str | None, xmpp_jid: str | None) -> list[RosterApproval]:
    """Approvals involving ``sip_jid`` and/or ``xmpp_jid`` (all when both are None)."""
    t = RosterApprovalRow
    stmt = select(t).order_by(col(t.sip_jid), col(t.xmpp_jid), col(t.direction))
    if sip_jid is not None:
        stmt = stmt.where(col(t.sip_jid) == sip_jid)
    if xmpp_jid is not None:
        stmt = stmt.where(col(t.xmpp_jid) == xmpp_jid)
    return [_approval(r) for r in session.scalars(stmt)]


def _membership(row: RoomMembershipRow) -> RoomMembership:
    return RoomMembership(
        sip_aor=row.sip_aor, room_jid=row.room_jid, nick=row.nick, state=row.state
    )


def save_membership(session: Session, membership: RoomMembership) -> None:
    """Insert or replace ``membership.sip_aor``'s seat in ``membership.room_jid``."""
    values: dict[str, Any] = {
        "sip_aor": membership.sip_aor,
        "room_jid": membership.room_jid,
        "nick": membership.nick,
        "state": membership.state,
    }
    _upsert(session, RoomMembershipRow, values, ["sip_aor", "room_jid"])


def memberships(
    session: Session, sip_aor: str | None, room_jid: str | None
) -> list[RoomMembership]:
    """Memberships of ``sip_aor`` and/or in ``room_jid`` (all when both are None)."""
    t = RoomMembershipRow
    stmt = select(t).order_by(col(t.sip_aor), col(t.room_jid))
    if sip_aor is not None:
        stmt = stmt.where(col(t.sip_aor) == sip_aor)
    if room_jid is not None:
        stmt = stmt.where(col(t.room_jid) == room_jid)
    return [_membership(r) for r in session.scalars(stmt)]


def _transport(row: TransportStatusRow) -> TransportStatus:
    return TransportStatus(
        domain=row.domain, up=row.up, checked_at=to_timestamp(row.checked_at), detail=row.detail
    )


def set_transport_status(session: Session, status: TransportStatus) -> None:
    """Insert or replace the probe result for ``status.domain``."""
    values: dict[str, Any] = {
        "domain": status.domain,
        "up": status.up,
        "checked_at": to_datetime(status.checked_at),
        "detail": status.detail,
    }
    _upsert(session, TransportStatusRow, values, ["domain"])


def transport_statuses(session: Session, domain: str | None) -> list[TransportStatus]:
    """Probe results, all or for one ``domain``."""
    t = TransportStatusRow
    stmt = select(t).order_by(col(t.domain))
    if domain is not None:
        stmt = stmt.where(col(t.domain) == domain)
    return [_transport(r) for r in session.scalars(stmt)]


def _count(session: Session, model: type[SQLModel], *where: Any) -> int:
    table = model.__table__  # type: ignore[attr-defined]
    stmt = select(func.count()).select_from(table).where(*where)
    return int(session.execute(stmt).scalar_one())


def counts(session: Session) -> StoreCounts:
    """Row counts for metrics: queue depth by state, subscriptions, rooms, transports."""
    t = QueuedMessageRow
    grouped = session.execute(select(col(t.state), func.count()).group_by(col(t.state)))
    by_state = {state: int(n) for state, n in grouped.all()}
    return StoreCounts(
        queued=int(by_state.get(MessageState.QUEUED, 0)),
        inflight=int(by_state.get(MessageState.INFLIGHT, 0)),
        delivered=int(by_state.get(MessageState.DELIVERED, 0)),
        failed=int(by_state.get(MessageState.FAILED, 0)),
        users_seen=_count(session, SeenUserRow),
        users_online=_count(session, SeenUserRow, col(SeenUserRow.online).is_(True)),
        sip_watchers=_count(session, SipWatcherSubscriptionRow),
        xmpp_watchers=_count(session, XmppWatcherSubscriptionRow),
        publications=_count(session, PublicationRow),
        memberships=_count(session, RoomMembershipRow),
        transports_down=_count(session, TransportStatusRow, col(TransportStatusRow.up).is_(False)),
    )
